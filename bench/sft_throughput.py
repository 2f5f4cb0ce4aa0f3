"""SFT throughput on the embedded 135M model: padding-free against padded batches, LoRA and full.

Prints effective (non-pad) tokens/s and model-FLOPs utilisation against this machine's own measured
fp32 matmul peak, for each mode, then the padding-free / padded ratios. Both batch layouts train on the
same conversations in the same order, in alternating runs, so machine noise hits them alike; figures
are medians over `--repeats` runs.

    .venv/bin/python bench/sft_throughput.py [--data oasst|demo] [--steps 4] [--repeats 3]

Model FLOPs per token count the matmuls a step must do: 6 x parameters for full fine-tuning (forward,
input gradients, weight gradients), 4 x parameters with LoRA (frozen weights need no weight gradients),
plus the attention score and value matmuls of each sequence (causal: half of 4 x T x d per layer, x3
for training). The matmul peak is the best of several large fp32 matrix products.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.datasets import load_records  # noqa: E402
from pipeline.models import (  # noqa: E402
    EMBEDDED_MODEL,
    LoraSettings,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    match_vocab,
    resolve_model,
)
from pipeline.packed_attention import use_packed_attention  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402
from stages.sft.train import AssistantLossTrainer, tokenize_dataset  # noqa: E402
from stages.sft.train import Config as StageConfig  # noqa: E402

SHARED = Path(os.environ.get("RLHF_SHARED_DATA", REPO.parent / "shared" / "data"))


def matmul_peak_gflops(size: int = 2048, repeats: int = 8) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (the first one, which warms caches up, is dropped later)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def conversations(source: str, limit: int) -> list[dict]:
    if source == "demo":
        return load_records(REPO / "data" / "demo" / "sft.jsonl", "conversation").records[:limit]
    trees = SHARED / "oasst-en100" / "en_100_tree.jsonl"
    return load_records(trees, "conversation", format="oasst").records[:limit]


def one_run(model_dir, store, tokenizer, dataset, *, lora: bool, padding_free: bool, steps: int, batch: int):
    torch.manual_seed(0)
    model = load_causal_lm(model_dir, store)
    match_vocab(model, tokenizer)
    if padding_free:
        use_packed_attention(model)  # as stages/sft does
    model = apply_lora(model, LoraSettings(enabled=lora))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=steps + 1,
            learning_rate=1e-5,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            padding_free=padding_free,
            activation_checkpointing=StageConfig.activation_checkpointing,  # as stages/sft trains
            max_length=None,
            bf16=False,
            seed=0,
            data_seed=0,
            disable_tqdm=True,
            dataloader_pin_memory=False,
            train_sampling_strategy="sequential",  # both layouts see the same conversations in the same order
        )
        trainer = AssistantLossTrainer(  # as stages/sft trains
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
        )
        trainer.train()
    n_params = sum(p.numel() for p in model.parameters())
    # Sequential batches: step i trained on rows [i * batch, (i + 1) * batch); step 0 was the warm-up.
    lengths = [
        [len(dataset[j]["input_ids"]) for j in range(i * batch, (i + 1) * batch)] for i in range(1, steps + 1)
    ]
    seconds = sum(timer.times[1 : steps + 1])
    tokens = sum(sum(step) for step in lengths)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    per_token = (6 if not lora else 4) * n_params
    attention = sum(3 * 2 * hidden * layers * t * t for step in lengths for t in step)
    return tokens / seconds, (per_token * tokens + attention) / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", choices=["oasst", "demo"], default="oasst")
    parser.add_argument(
        "--steps", type=int, default=4, help="timed optimizer steps per run (after one warm-up)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="full,lora")
    args = parser.parse_args()

    store = ArtifactStore(os.environ.get("RLHF_STORE", REPO / "artifacts"))
    model_dir = resolve_model(EMBEDDED_MODEL, store)
    tokenizer = load_tokenizer(model_dir.path)
    records = conversations(args.data, limit=args.batch * (args.steps + 1) * 2)
    dataset, _ = tokenize_dataset(records, tokenizer, args.max_length)
    lengths = sorted(len(row) for row in dataset["input_ids"])
    print(
        f"data: {args.data}, {len(dataset)} conversations, tokens p50={lengths[len(lengths) // 2]} "
        f"p90={lengths[int(len(lengths) * 0.9)]} max={lengths[-1]}; torch threads={torch.get_num_threads()}"
    )
    # The peak is measured again before every run: on a shared machine MFU is only meaningful against
    # what the cores could do at that moment.
    peaks: list[float] = []
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for repeat in range(args.repeats):
        for mode in args.modes.split(","):
            for padding_free in (True, False):
                peaks.append(matmul_peak_gflops())
                tps, gflops = one_run(
                    model_dir, store, tokenizer, dataset,
                    lora=mode == "lora", padding_free=padding_free, steps=args.steps, batch=args.batch,
                )  # fmt: skip
                results.setdefault((mode, padding_free), []).append((tps, gflops))
                layout = "padding-free" if padding_free else "padded"
                print(
                    f"run {repeat + 1}: {mode:4s} {layout:12s} {tps:8.1f} tok/s  {gflops:6.1f} GFLOP/s"
                    f"  (matmul peak just before: {peaks[-1]:.1f})",
                    flush=True,
                )

    peak = statistics.median(peaks)
    print(f"\nmedian measured fp32 matmul peak: {peak:.1f} GFLOP/s")
    print("medians:")
    for mode in args.modes.split(","):
        row = {}
        for padding_free in (True, False):
            runs = results[(mode, padding_free)]
            tps = statistics.median(r[0] for r in runs)
            mfu = statistics.median(r[1] for r in runs) / peak
            row[padding_free] = tps
            layout = "padding-free" if padding_free else "padded"
            print(
                f"  {mode:4s} {layout:12s} {tps:8.1f} effective tok/s   MFU {mfu:6.1%} of measured matmul peak"
            )
        print(f"  {mode:4s} padding-free / padded: {row[True] / row[False]:.2f}x")


if __name__ == "__main__":
    main()
