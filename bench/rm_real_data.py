"""Stage 2 on real human preferences: the embedded SmolLM2-135M as a reward model on HH-RLHF and OpenAssistant.

    .venv/bin/python bench/rm_real_data.py --dataset hh      # Anthropic HH helpful-base pairs (K = 2)
    .venv/bin/python bench/rm_real_data.py --dataset oasst   # OpenAssistant ranked replies (K = 2..9)

Each run trains the reward stage (stages/reward/train.py, unchanged) for one epoch on part of the data
and reports held-out pairwise accuracy with a 95% Wilson interval, accuracy per K and Kendall tau. Only
the data in ../shared/data is used: HH's helpful-base test split (train on some pairs, hold out others)
and the oasst-en100 trees. To fit ~10-15 minutes on 2 CPU cores the adapter sits on the top
`--lora-layers` layers (gradients then stop there, which halves a step's cost) and prompts are cut on
the left to `--max-length` tokens. A "length only" line gives the accuracy of preferring the longer
reply, the bias a reward model must beat to have learnt anything beyond it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.datasets import load_records  # noqa: E402
from pipeline.models import EMBEDDED_MODEL, LoraSettings, resolve_model  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402
from stages.reward import train as reward_train  # noqa: E402

SHARED = Path(os.environ.get("RLHF_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCES = {
    "hh": (SHARED / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "hh-rlhf"),
    "oasst": (SHARED / "oasst-en100" / "en_100_tree.jsonl", "oasst"),
}
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
PROJECTIONS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def top_layer_modules(model_path: str, layers: int) -> list[str]:
    """Module-name suffixes for every linear layer of the top `layers` decoder layers (peft matches suffixes)."""
    total = json.loads((Path(model_path) / "config.json").read_text())["num_hidden_layers"]
    return [f"layers.{i}.{name}" for i in range(total - layers, total) for name in PROJECTIONS]


def wilson(correct: float, n: float, z: float = 1.96) -> tuple[float, float]:
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def length_only_accuracy(records: list[dict]) -> float:
    right = total = 0
    for r in records:
        for b, rank_b in enumerate(r["ranks"]):
            for w, rank_w in enumerate(r["ranks"]):
                if rank_b < rank_w:
                    total += 1
                    right += len(r["completions"][b]) > len(r["completions"][w])
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(SOURCES), default="hh")
    parser.add_argument("--train", type=int, help="training groups (default: hh 320, oasst 120)")
    parser.add_argument("--eval", type=int, help="held-out groups (default: hh 200, oasst 60)")
    parser.add_argument("--max-length", type=int, help="tokens per sequence (default: hh 160, oasst 224)")
    parser.add_argument("--lora-layers", type=int, default=8, help="adapt the top N layers (0: all)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--groups-per-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--store", default=str(REPO / "artifacts"), help="store holding the converted base model"
    )
    args = parser.parse_args()
    defaults = {"hh": (320, 200, 160), "oasst": (120, 60, 224)}[args.dataset]
    n_train = args.train or defaults[0]
    n_eval = args.eval or defaults[1]
    max_length = args.max_length or defaults[2]

    path, data_format = SOURCES[args.dataset]
    loaded = load_records(path, "comparison", format=data_format, skip_invalid=True)
    records = list(loaded.records)
    random.Random(args.seed).shuffle(records)
    held, train = records[:n_eval], records[n_eval : n_eval + n_train]
    base = resolve_model(EMBEDDED_MODEL, ArtifactStore(args.store))
    targets = top_layer_modules(base.path, args.lora_layers) if args.lora_layers else ["all-linear"]
    print(f"{args.dataset}: {len(records)} groups ({loaded.dropped} invalid dropped); train {len(train)}, "
          f"held out {len(held)}; max_length {max_length}; LoRA r16 on "
          f"{'the top ' + str(args.lora_layers) + ' layers' if args.lora_layers else 'every layer'}; lr {args.lr}")  # fmt: skip
    print(f"length only (prefer the longer reply) on the held-out pairs: {length_only_accuracy(held):.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, part in (("train", train), ("held", held)):
            (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        cfg = reward_train.Config(
            store=str(work / "store"),
            model=base.path,
            data=str(work / "train.jsonl"),
            eval_data=str(work / "held.jsonl"),
            normalise_on=None,
            lora=LoraSettings(r=16, alpha=32, target_modules=targets),
            learning_rate=args.lr,
            epochs=1,
            groups_per_batch=args.groups_per_batch,
            max_length=max_length,
            eval_every=0,
            checkpoint_every=0,
            report_to="none",
            seed=args.seed,
        )
        started = time.perf_counter()
        artifact = reward_train.run(cfg, ArtifactStore(cfg.store))
        total = time.perf_counter() - started
    m = artifact.metrics
    pairs = sum(sum(a < b for a in r["ranks"] for b in r["ranks"]) for r in held)
    low, high = wilson(m["eval_accuracy"] * pairs, pairs)
    per_k = ", ".join(
        f"K={k[len('eval_accuracy_k') :]} {v:.3f}" for k, v in m.items() if k.startswith("eval_accuracy_k")
    )
    print(f"train {m['train_seconds']:.0f} s for {m['steps']} steps; whole run {total:.0f} s; "
          f"truncated prompts {m['truncated_prompts']}")  # fmt: skip
    print(f"held-out pairwise accuracy {m['eval_accuracy']:.3f} over {pairs} pairs (95% CI {low:.3f}-{high:.3f}); "
          f"per K: {per_k}; Kendall tau {m['eval_kendall_tau']:.3f}; mean margin {m['eval_margin']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
