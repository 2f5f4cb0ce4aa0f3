"""The rollout-engine protocol, and which engine a setting names.

An engine samples responses from a policy whose weights change between samples (PPO updates it after
every rollout), so it has two calls besides sampling: `sync(model)` takes the model's current weights
(LoRA adapters merged in) for the samples that follow, and `sample`/`stream` draw from them. An engine
keeps what it needs between syncs (a weight layout, an inference copy), and nothing else. A new engine
(vLLM colocated with training, as TRL's GRPO runs it: `sync` loads the gathered weights into the vLLM
engine, `sample` calls its generate with our sampler's settings) is one new file and one line here.

`auto` picks by a fixed rule, recorded in the manifest and the checkpoint so a resume under another
engine is refused:

1. a model on an accelerator, sharded across processes, or not a Llama in fp32 -> `hf`;
2. a CPU that can build and run the panel kernel (AVX-512 and a C++ compiler) -> `cpu-kernel`;
3. otherwise -> `cpu-llama`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Literal, Protocol

import torch
from torch import nn

from pipeline.generation.hf import HFEngine
from pipeline.generation.llama import LlamaEngine, check_llama
from pipeline.generation.panel_linear import kernel_missing_reason
from pipeline.generation.sampling import SamplingSettings, Sequences
from pipeline.generation.weights import is_sharded
from pipeline.models import ModelError

EngineName = Literal["auto", "hf", "cpu-llama", "cpu-kernel"]


class Engine(Protocol):
    """Sampling from a model's weights as of the last `sync`."""

    name: str

    def sync(self, model: nn.Module) -> None:
        """Take the model's current weights (adapters merged, as they compute now)."""
        ...

    def sample(
        self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, generator: torch.Generator | None
    ) -> Sequences:
        """Responses to a batch of prompts (token ids), drawn with `generator`."""
        ...

    def stream(
        self, prompt: Sequence[int], settings: SamplingSettings, generator: torch.Generator | None
    ) -> Iterator[int]:
        """One prompt's response, token by token as it is drawn (its stop token last)."""
        ...


def choose_engine(name: EngineName, model: nn.Module) -> str:
    """The engine `name` stands for with this model on this machine (the rule in the module doc)."""
    if name != "auto":
        return name
    if is_sharded(model):
        return "hf"
    try:
        check_llama(model, "auto")
    except ModelError:
        return "hf"
    return "cpu-kernel" if kernel_missing_reason() is None else "cpu-llama"


def make_engine(name: EngineName, model: nn.Module, *, stop_ids: Sequence[int], pad_id: int) -> Engine:
    """The engine `name` names for `model`, ready to `sync`; an engine that cannot run here is refused.

    `cpu-kernel` builds its kernel here (a message with the time it took), never in the middle of a rollout.
    """
    chosen = choose_engine(name, model)
    if chosen == "hf":
        return HFEngine(model, stop_ids=stop_ids, pad_id=pad_id)
    layout = "panels" if chosen == "cpu-kernel" else "onednn"
    engine = LlamaEngine(model, layout=layout, stop_ids=stop_ids, pad_id=pad_id)
    if chosen == "cpu-kernel":
        print(f"rollout engine cpu-kernel: kernel ready in {engine.build_seconds:.1f} s", file=sys.stderr)
    return engine
