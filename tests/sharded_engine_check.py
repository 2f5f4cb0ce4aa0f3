"""Run by tests/test_generation.py under torchrun with 2 gloo processes: the hf engine on a policy sharded
with torch's fully_shard (FSDP2) samples what it samples from the same policy whole.

Accelerate only shards with FSDP on accelerators (on a CPU it turns an FSDP config into DDP), so this
drives fully_shard directly: the engine's gather path is the same either way.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.generation import SamplingSettings, make_engine
from pipeline.models import LoraSettings, apply_lora


def main(out: str) -> None:
    dist.init_process_group("gloo")
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = apply_lora(LlamaForCausalLM(config), LoraSettings(r=4))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.5)
    whole = copy.deepcopy(model)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    prompts = [[5, 7, 9, 11], [3, 4]]
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0)
    results = {}
    for name, policy in (("sharded", model), ("whole", whole)):
        engine = make_engine("auto", policy, stop_ids=[2], pad_id=0)
        engine.sync(policy)
        seq = engine.sample(prompts, settings, torch.Generator().manual_seed(1))
        results[name] = {
            "engine": engine.name,
            "response": seq.response.tolist(),
            "logprobs": seq.logprobs.tolist(),
        }
    sharded_weight = next(p for n, p in model.named_parameters() if "embed_tokens" in n)
    results["local_rows"] = sharded_weight.to_local().shape[0]  # a shard: half the vocabulary's rows
    if dist.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
