"""The evaluation's exact KL over the vocabulary: `rl.kl_from_logits` against the whole-batch formula.

The peer is the formula it replaced, log_softmax twice over the whole [B, T, V] batch and
sum(exp(log_p) * (log_p - log_q)): five batch-sized temporaries. Ours takes blocks of
`rl.KL_ROWS_PER_BLOCK` rows. Both run on the same random logits, at the evaluation's batch shape
(16 replies x 48 positions x the embedded model's 49,152-token vocabulary), alternately, and the script
prints the median of each, their ratio, and the largest difference between their results.

    .venv/bin/python bench/exact_kl.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.ppo import rl  # noqa: E402


def whole_batch_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits, dim=-1)
    log_q = torch.log_softmax(ref_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 48, 49152, generator=generator)
    ref_logits = logits + 0.3 * torch.randn(16, 48, 49152, generator=generator)
    times: dict[str, list[float]] = {"whole batch (peer)": [], "blocks (ours)": []}
    for _ in range(args.repeats):
        for name, kl in (("whole batch (peer)", whole_batch_kl), ("blocks (ours)", rl.kl_from_logits)):
            start = time.perf_counter()
            kl(logits, ref_logits)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"{name:>20}: {seconds:.3f} s (median of {args.repeats})")
    print(f"{'ratio':>20}: {medians['whole batch (peer)'] / medians['blocks (ours)']:.2f}x")
    difference = (whole_batch_kl(logits, ref_logits) - rl.kl_from_logits(logits, ref_logits)).abs().max()
    print(f"{'max difference':>20}: {difference.item():.2e} nats")


if __name__ == "__main__":
    main()
