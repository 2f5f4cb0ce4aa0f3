"""K-wise reward training (stage 2) against TRL's RewardTrainer on the C(K,2) pair expansion of the same data.

Both train the same model with the same LoRA, learning rate, schedule and seed for one epoch over the
same K = 4 ranked groups, taking the same ranked pairs per optimizer step: ours takes G groups per step
(G x K rows, each completion scored once, loss over its G x C(K,2) pairs); TRL takes G x C(K,2)
chosen/rejected pairs per step (2 x G x C(K,2) rows: each completion scored K - 1 times). With K = 4 and
no ties both losses are the mean over the same number of pairs, so the optimisation is the same in
expectation and the difference is the work per step. Both are then scored on the same held-out groups
(every group not trained on, any K) by the same code: pairwise accuracy over every ranked pair. Each
run draws its own split and seed and alternates which trainer goes first; the speedup is the median of
the runs' TRL / ours epoch-time ratios (each ratio compares two trainings done back to back).

    .venv/bin/python bench/rm_kwise.py            # the embedded SmolLM2-135M (slow on 2 cores)
    .venv/bin/python bench/rm_kwise.py --quick    # its first 4 layers only: seconds per run

The last line is `speedup: <TRL epoch time / ours>`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.chat import tokenize_completion  # noqa: E402
from pipeline.datasets import load_records  # noqa: E402
from pipeline.models import EMBEDDED_MODEL, LoraSettings, load_tokenizer, resolve_model  # noqa: E402
from pipeline.scoring import RewardScorer  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402
from stages.reward import train as reward_train  # noqa: E402
from stages.reward.groups import bucket_batches, collate, tokenize_comparisons  # noqa: E402
from stages.reward.losses import add_sums, ranking_metrics, ranking_sums  # noqa: E402

SHARED = Path(os.environ.get("RLHF_SHARED_DATA", REPO.parent / "shared" / "data"))
LORA = LoraSettings(r=16, alpha=32)


def comparisons(source: str) -> list[dict]:
    if source == "oasst":
        return load_records(
            SHARED / "oasst-en100" / "en_100_tree.jsonl", "comparison", format="oasst"
        ).records
    return load_records(REPO / "data" / "demo" / "comparisons.jsonl", "comparison").records


def split(records: list[dict], k: int, n_train: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Training groups: K completions with K distinct ranks (larger oasst groups cut to their top K).

    Held out: every other group with a ranked pair, whatever its K, so that accuracy is measured on
    hundreds of pairs rather than a handful.
    """
    records = list(records)
    random.Random(seed).shuffle(records)
    train, held = [], []
    for record in records:
        order = sorted(range(len(record["ranks"])), key=lambda i: record["ranks"][i])[:k]
        ranks = [record["ranks"][i] for i in order]
        if len(train) < n_train and len(order) == k and len(set(ranks)) == k:
            train.append({**record, "completions": [record["completions"][i] for i in order], "ranks": ranks})
        elif len(set(record["ranks"])) > 1:
            held.append(record)
    return train, held


def quick_model(base_path: str, out: Path, layers: int) -> str:
    """The embedded model cut to its first `layers` layers: pretrained embeddings and trunk, a fraction of the cost."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (out / "config.json").is_file():
        config = AutoConfig.from_pretrained(base_path)
        config.num_hidden_layers = layers
        model = AutoModelForCausalLM.from_pretrained(base_path, config=config, dtype=torch.float32)
        model.save_pretrained(out)
        load_tokenizer(base_path).save_pretrained(out)
    return str(out)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def run_ours(
    model_path: str, train_file: str, held_file: str, args, seed: int, work: Path
) -> tuple[float, float]:
    cfg = reward_train.Config(
        store=str(work / "store"),
        model=model_path,
        data=train_file,
        eval_data=held_file,
        normalise_on=None,
        lora=LORA,
        learning_rate=args.lr,
        epochs=1,
        groups_per_batch=args.groups_per_batch,
        max_length=args.max_length,
        eval_every=0,
        checkpoint_every=0,
        report_to="none",
        seed=seed,
    )
    artifact = reward_train.run(cfg, ArtifactStore(cfg.store))
    return artifact.metrics["train_seconds"], artifact.metrics["eval_accuracy"]


def run_trl(
    model_path: str, train: list[dict], held: list[dict], args, seed: int, work: Path
) -> tuple[float, float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tokenizer = load_tokenizer(model_path)
    pairs = []  # the C(K,2) expansion, tokenized exactly as our stage tokenizes
    for record in train:
        ids = [
            tokenize_completion(tokenizer, record["prompt"], c, args.max_length).input_ids
            for c in record["completions"]
        ]
        for b, rank_b in enumerate(record["ranks"]):
            for w, rank_w in enumerate(record["ranks"]):
                if rank_b < rank_w:
                    pairs.append({"chosen_ids": ids[b], "rejected_ids": ids[w]})
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    config = RewardConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.groups_per_batch
        * args.k
        * (args.k - 1)
        // 2,  # ours' pairs per step
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_length=None,
        logging_steps=10_000,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        bf16=False,  # fp32: bf16 matmul is hundreds of times slower on CPU
    )
    lora = LoraConfig(
        r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS"
    )
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        peft_config=lora,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return seconds, held_out_accuracy(trainer.model, tokenizer, held, args, seed)


@torch.no_grad()
def held_out_accuracy(model, tokenizer, held: list[dict], args, seed: int) -> float:
    scorer = RewardScorer(model).eval()
    groups, _ = tokenize_comparisons(tokenizer, held, args.max_length)
    sums: dict[str, float] = {}
    for batch in bucket_batches(groups, args.groups_per_batch, seed):
        packed = collate(batch, tokenizer.pad_token_id)
        add_sums(
            sums,
            ranking_sums(
                scorer(packed["input_ids"], packed["attention_mask"]), packed["ranks"], packed["groups"]
            ),
        )
    return ranking_metrics(sums)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the embedded model's first 4 layers only")
    parser.add_argument("--data", choices=["demo", "oasst"], default="demo")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--train-groups", type=int, default=56)
    parser.add_argument("--groups-per-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--store", default=str(REPO / "artifacts"), help="store holding (or to hold) the converted base model"
    )
    args = parser.parse_args()

    base = resolve_model(EMBEDDED_MODEL, ArtifactStore(args.store))
    model_path = quick_model(base.path, REPO / ".bench" / "smollm2-4-layers", 4) if args.quick else base.path
    records = comparisons(args.data)
    train, held = split(records, args.k, args.train_groups, args.seed)
    pairs = len(train) * args.k * (args.k - 1) // 2
    print(f"model {'first 4 layers of ' if args.quick else ''}{EMBEDDED_MODEL}; {len(train)} train groups "
          f"(K={args.k}, {pairs} pairs for TRL), {len(held)} held-out groups (any K); {args.groups_per_batch} groups "
          f"= {args.groups_per_batch * args.k * (args.k - 1) // 2} pairs per step; lr {args.lr}; torch threads {torch.get_num_threads()}")  # fmt: skip

    results: dict[str, list[tuple[float, float]]] = {"ours": [], "trl": []}
    for run in range(args.runs):
        seed = args.seed + run  # each run draws its own split and initialisation
        train, held = split(records, args.k, args.train_groups, seed)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            train_file = write_jsonl(work / "train.jsonl", train)
            held_file = write_jsonl(work / "held.jsonl", held)
            for name in ["ours", "trl"] if run % 2 == 0 else ["trl", "ours"]:
                if name == "ours":
                    seconds, accuracy = run_ours(model_path, train_file, held_file, args, seed, work)
                else:
                    seconds, accuracy = run_trl(model_path, train, held, args, seed, work)
                results[name].append((seconds, accuracy))
                print(
                    f"run {run + 1} {name:>4}: epoch {seconds:7.1f} s, held-out pairwise accuracy {accuracy:.3f}",
                    flush=True,
                )

    med = statistics.median
    ours_t, ours_acc = zip(*results["ours"], strict=True)
    trl_t, trl_acc = zip(*results["trl"], strict=True)
    # Each run's ratio compares two trainings done back to back, so a busy machine biases neither side.
    ratios = [t / o for o, t in zip(ours_t, trl_t, strict=True)]
    print(f"ours (K-wise, each completion once): epoch {med(ours_t):.1f} s, accuracy {med(ours_acc):.3f}")
    print(f"TRL RewardTrainer (C(K,2) pairs):     epoch {med(trl_t):.1f} s, accuracy {med(trl_acc):.3f}")
    print(f"accuracy ours - TRL (median of runs): {med(ours_acc) - med(trl_acc):+.3f}")
    print(f"per-run speedups: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"speedup: {med(ratios):.2f}")


if __name__ == "__main__":
    main()
