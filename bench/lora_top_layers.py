"""One SFT-sized training pass with the LoRA adapter on every layer against the top 22 and top 15
(`lora.top_layers`), on the embedded model.

The peer is the adapter on every layer (what SFT and the reward model did before the setting existed).
Each setting runs a forward and backward pass over one packed row of 960 tokens (the demo SFT step's
size), logits kept for the last 559 positions as the assistant-only loss keeps them; the settings take
turns, and the script prints the median seconds of each and its ratio to every layer.

    .venv/bin/python bench/lora_top_layers.py --model /path/to/base-artifact [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import LoraSettings, apply_lora  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a converted base model folder (the store's base artifact)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ids = torch.randint(0, 49000, (1, 960), generator=torch.Generator().manual_seed(0))
    keep = torch.arange(400, 959)
    models = {}
    for top in (0, 22, 15):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        models[top] = apply_lora(model, LoraSettings(top_layers=top)).train()
    times: dict[int, list[float]] = {top: [] for top in models}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for top, model in models.items():
            started = time.perf_counter()
            model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits.logsumexp(-1).mean().backward()
            if repeat:
                times[top].append(time.perf_counter() - started)
    every = statistics.median(times[0])
    for top, seconds in times.items():
        name = "every layer (peer)" if top == 0 else f"top {top}"
        print(f"{name:>20}: {statistics.median(seconds):.2f} s  ({every / statistics.median(seconds):.2f}x)")


if __name__ == "__main__":
    main()
