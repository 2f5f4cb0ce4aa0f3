"""PPO rollout speed on the embedded 135M model with a LoRA adapter, against this machine's roofline.

For batch sizes 1, 8 and 32, generates `--new-tokens` tokens per prompt (no early stop, so every run
produces exactly batch x new_tokens tokens) from the demo prompts, through:

- `generate`: transformers' `generate` on the peft model as it is (adapter unmerged, sampling): the peer;
- each rollout engine of pipeline.generation that runs here: `hf` (generate on a merged inference copy,
  drawing with our sampler), `cpu-llama` (our Llama decode step, oneDNN products) and `cpu-kernel` (the
  same with our AVX-512 kernel, pipeline/generation/panel_linear.cpp). An engine's `sync` (merging the
  adapter, laying the weights out) is timed as part of its rollout, as PPO pays it once per step.

The bound per decode step is max(2 x params x batch FLOPs at the fp32 matmul peak, weight bytes at the
memory bandwidth), both measured here in the same run (best of several large matmuls; best of several
reductions over a 1 GiB tensor). Figures are tokens/s, medians over `--repeats` runs, and % of bound.

    .venv/bin/python bench/rollout.py [--new-tokens 64] [--repeats 3] [--batches 1 8 32] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.chat import prompt_ids  # noqa: E402
from pipeline.datasets import load_records  # noqa: E402
from pipeline.generation import SamplingSettings, left_pad, make_engine  # noqa: E402
from pipeline.generation.panel_linear import kernel_missing_reason  # noqa: E402
from pipeline.models import (  # noqa: E402
    EMBEDDED_MODEL,
    LoraSettings,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    match_vocab,
    resolve_model,
)
from pipeline.store import ArtifactStore  # noqa: E402


def matmul_peak_flops(size: int = 2048, repeats: int = 8) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best


def memory_bandwidth(gib: float = 1.0, repeats: int = 8) -> float:
    """Bytes/s reading a large fp32 tensor once (a sum), as a decode step reads every weight once."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = min(timed(lambda: x.sum()) for _ in range(repeats))
    return x.numel() * 4 / best


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def plain_generate(model, query, mask, n: int, pad_id: int) -> None:
    out = model.generate(
        input_ids=query, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id,
    )  # fmt: skip
    assert out.shape[1] == query.shape[1] + n


def engine_rollout(engine, model, prompts, n: int) -> None:
    engine.sync(model)
    seq = engine.sample(prompts, SamplingSettings(max_new_tokens=n), torch.Generator().manual_seed(0))
    assert seq.response.shape[1] == n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--store", default=os.environ.get("RLHF_STORE", str(REPO / "artifacts")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    store = ArtifactStore(args.store)
    resolved = resolve_model(EMBEDDED_MODEL, store)
    tokenizer = load_tokenizer(resolved.path)
    model = load_causal_lm(resolved, store)
    match_vocab(model, tokenizer)
    model = apply_lora(model, LoraSettings(r=16, alpha=32)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (peft starts B at zero, which merges to nothing)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    params = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    weight_bytes = params * 4

    peak, bandwidth = matmul_peak_flops(), memory_bandwidth()
    print(f"threads {torch.get_num_threads()}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {params / 1e6:.1f}M params ({weight_bytes / 1e6:.0f} MB)")  # fmt: skip

    prompts = [
        prompt_ids(tokenizer, r["prompt"])
        for r in load_records(REPO / "data/demo/prompts.jsonl", "prompt").records
    ]
    n = args.new_tokens
    names = ["hf", "cpu-llama"] + ([] if kernel_missing_reason() else ["cpu-kernel"])
    print(
        f"engines: {', '.join(names)}"
        + (f" (cpu-kernel: {kernel_missing_reason()})" if kernel_missing_reason() else "")
    )
    # stop_ids=[]: no early stop, every run makes exactly batch x n tokens.
    engines = {name: make_engine(name, model, stop_ids=[], pad_id=tokenizer.pad_token_id) for name in names}
    columns = ["generate", *names]
    print(f"{'batch':>5} {'bound tok/s':>12} " + " ".join(f"{c:>10} {'%':>4}" for c in columns)
          + " " + " ".join(f"{c + ' vs gen':>16}" for c in names))  # fmt: skip
    results = {}
    for batch in args.batches:
        batch_prompts = prompts[:batch]
        query, mask = left_pad(batch_prompts, tokenizer.pad_token_id, torch.device("cpu"))
        step = max(2 * params * batch / peak, weight_bytes / bandwidth)
        bound = batch / step

        with torch.no_grad():
            times = {c: [] for c in columns}
            for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
                times["generate"].append(timed(plain_generate, model, query, mask, n, tokenizer.pad_token_id))
                for name, engine in engines.items():
                    times[name].append(timed(engine_rollout, engine, model, batch_prompts, n))
        rate = {k: batch * n / statistics.median(v) for k, v in times.items()}
        results[batch] = rate
        print(f"{batch:>5} {bound:>12.1f} " + " ".join(f"{rate[c]:>10.1f} {100 * rate[c] / bound:>4.0f}" for c in columns)
              + " " + " ".join(f"{rate[c] / rate['generate']:>15.2f}x" for c in names))  # fmt: skip
    if 8 in results:
        step = max(2 * params * 8 / peak, weight_bytes / bandwidth)
        for name in names:
            print(f"batch-8 rollout, {name}: {100 * results[8][name] * step / 8:.0f}% of the roofline bound")


if __name__ == "__main__":
    main()
