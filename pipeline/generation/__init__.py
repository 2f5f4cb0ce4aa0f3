"""Sampling engines behind one small protocol, chosen by a setting: PPO's rollouts and evaluation, the
app's chat and arena, and `rlhf label generate` all sample through them.

- engines.py: the protocol (`sync`, `sample`, `stream`) and the `auto` rule;
- sampling.py: the settings, the `Sequences` record, and the draw every engine shares;
- hf.py: transformers' `generate` (any causal LM, any device, sharded models gathered);
- llama.py (+ panel_linear.py/.cpp): our Llama decode step for CPUs, with oneDNN or our AVX-512 kernel;
- policy.py: a model source loaded with its tokenizer and engine, answering conversations as text.
"""

from pipeline.generation.engines import Engine, EngineName, choose_engine, make_engine
from pipeline.generation.policy import LoadedPolicy, load_policy
from pipeline.generation.sampling import SamplingSettings, Sequences, left_pad, position_ids

__all__ = [
    "Engine",
    "EngineName",
    "LoadedPolicy",
    "SamplingSettings",
    "Sequences",
    "choose_engine",
    "left_pad",
    "load_policy",
    "make_engine",
    "position_ids",
]
