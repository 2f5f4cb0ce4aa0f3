"""The matrix products of one batch-8 decode step of the embedded model, against reading the same bytes.

Every linear layer of the embedded 135M model (q/k/v and gate/up fused, as pipeline.generation.llama runs them,
plus the vocabulary projection) multiplied by 8 rows, three ways, each over its own copy of the weights:

- `panel`: our kernel (pipeline/generation/panel_linear.cpp) over weights in 16-column panels;
- `oneDNN`: oneDNN's product over its pre-packed layout (what the decoder used before);
- `F.linear`: PyTorch's plain fp32 linear.

The weights are random (only their shapes matter) and 538 MB in all, so every pass reads them from
memory. Figures are GB/s of weights streamed (medians of `--repeats` passes), next to a plain sum over
the same tensors and over one 1 GiB tensor (bench/rollout.py's bandwidth for the roofline).

    .venv/bin/python bench/decode_matmul.py [--rounds 3] [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.generation.llama import PackedLinear  # noqa: E402
from pipeline.generation.panel_linear import PanelLinear, build_kernel, kernel_missing_reason  # noqa: E402

# SmolLM2-135M: hidden 576, MLP 1536, 30 layers, 9 query and 3 key/value heads of 64, vocabulary 49152.
HIDDEN, MLP, LAYERS, QKV, VOCAB = 576, 1536, 30, 576 + 2 * 192, 49152
SHAPES = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * MLP, HIDDEN), (HIDDEN, MLP)] * LAYERS + [(VOCAB, HIDDEN)]


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_pass(layers, weights, inputs) -> None:
    for layer, weight in zip(layers, weights, strict=True):
        layer(inputs[weight.shape[1]])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if kernel_missing_reason():
        sys.exit(f"the panel kernel does not run here: {kernel_missing_reason()}")
    build_kernel()

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=generator) * 0.02 for n, k in SHAPES]
    nbytes = sum(w.numel() for w in weights) * 4
    inputs = {k: torch.randn(8, k, generator=generator) for k in (HIDDEN, MLP)}
    kinds = {
        "panel": [PanelLinear([(w, None)], None) for w in weights],
        "oneDNN": [PackedLinear(w, None, 8) for w in weights],
        "F.linear": [lambda x, w=w: F.linear(x, w) for w in weights],
    }
    big = torch.ones(2**28)
    print(f"threads {torch.get_num_threads()}; {len(weights)} matrices, {nbytes / 1e6:.0f} MB; GB/s:")
    print(f"{'round':>5} {'sum 1 GiB':>10} {'sum weights':>12} {'panel':>7} {'oneDNN':>7} {'F.linear':>9} {'panel/oneDNN':>13}")  # fmt: skip
    ratios = []
    with torch.no_grad():
        for round_ in range(args.rounds):
            rate = {"sum 1 GiB": 2**30 / median_seconds(big.sum, args.repeats) / 1e9}
            rate["sum weights"] = (
                nbytes / median_seconds(lambda: [w.sum() for w in weights], args.repeats) / 1e9
            )
            for name, layers in kinds.items():
                step = functools.partial(one_pass, layers, weights, inputs)
                rate[name] = nbytes / median_seconds(step, args.repeats) / 1e9
            ratios.append(rate["panel"] / rate["oneDNN"])
            print(f"{round_:>5} {rate['sum 1 GiB']:>10.1f} {rate['sum weights']:>12.1f} {rate['panel']:>7.1f} "
                  f"{rate['oneDNN']:>7.1f} {rate['F.linear']:>9.1f} {ratios[-1]:>12.2f}x")  # fmt: skip
    print(f"panel over oneDNN: {statistics.median(ratios):.2f}x (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
