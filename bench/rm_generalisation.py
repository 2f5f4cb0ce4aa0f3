"""Does the reward model generalise? Train on one HH-RLHF collection, judge pairs from another.

    .venv/bin/python bench/rm_generalisation.py [--variants NAME[:KEY=VALUE,...] ...] \\
        [--directions base:rs rs:base] [--train-pairs 600] [--eval-pairs 400] [--curve 4] [--oasst]

Collections (../shared/data/hh-rlhf, test splits, never tuned on): `base` is helpful-base, `rs` is
helpful-rejection-sampled. A direction A:B trains the reward stage (stages/reward/train.py, through its
own Config, from the embedded SmolLM2-135M-Instruct) for one epoch on `--train-pairs` pairs of A (a
seeded shuffle) and evaluates it on `--eval-pairs` pairs of B: `--curve` times during training (the
learning curve: accuracy against training pairs seen) and at the end. `--oasst` also scores the
OpenAssistant ranked trees (K = 2..9) with the final model. Every accuracy comes with its 95% Wilson
interval and the accuracy of preferring the longer reply on the same pairs. Training time is the
stage's own train_seconds: the final evaluation and normalisation excluded, the curve's evaluations
during training included.

A variant is a name and reward-stage settings (values as YAML), e.g.
`top8:lora_layers=8,learning_rate=1e-3` or `full:lora.enabled=false,learning_rate=1e-5`;
`lora_layers=N` puts the adapter on the top N layers only (gradients then stop there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.chat import tokenize_completion  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.datasets import load_records, write_jsonl  # noqa: E402
from pipeline.models import EMBEDDED_MODEL, load_tokenizer, resolve_model  # noqa: E402
from pipeline.scoring import load_reward  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402
from stages.reward import train as reward_train  # noqa: E402

SHARED = Path(os.environ.get("RLHF_SHARED_DATA", REPO.parent / "shared" / "data"))
COLLECTIONS = {
    "base": SHARED / "hh-rlhf" / "helpful-base" / "test.jsonl.gz",
    "rs": SHARED / "hh-rlhf" / "helpful-rejection-sampled" / "test.jsonl.gz",
}
OASST = SHARED / "oasst-en100" / "en_100_tree.jsonl"
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
PROJECTIONS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# The recipe's defaults; a variant overrides any of them.
BASE_SETTINGS = {
    "model": EMBEDDED_MODEL,
    "epochs": 1,
    "groups_per_batch": 8,
    "max_length": 320,
    "learning_rate": 3e-4,
    "lora": {"enabled": True, "r": 16, "alpha": 32},
    "normalise_on": str(REPO / "data" / "demo" / "sft.jsonl"),
    "normalise_limit": 16,
    "report_to": "tensorboard",
    "checkpoint_every": 0,
}


def wilson(correct: float, n: float, z: float = 1.96) -> tuple[float, float]:
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def longer_reply_accuracy(records: list[dict]) -> float:
    """How often the better-ranked completion of a pair is also the longer one (ties count half)."""
    right = total = 0.0
    for record in records:
        for a, rank_a in enumerate(record["ranks"]):
            for b, rank_b in enumerate(record["ranks"]):
                if rank_a < rank_b:
                    la, lb = len(record["completions"][a]), len(record["completions"][b])
                    right += 1.0 if la > lb else 0.5 if la == lb else 0.0
                    total += 1
    return right / total


def length_percentiles(records: list[dict]) -> dict[int, int]:
    """Tokens of prompt + reply (chat template included) at the 50th, 90th and 99th percentiles: what a
    `max_length` keeps whole."""
    tokenizer = load_tokenizer(resolve_model(EMBEDDED_MODEL, STORE).path)
    lengths = sorted(
        len(tokenize_completion(tokenizer, r["prompt"], c).input_ids)
        for r in records
        for c in r["completions"]
    )
    return {q: lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in (50, 90, 99)}


def pairs(source: Path, count: int, *, held_out: bool, seed: int) -> list[dict]:
    """`count` pairs of a collection: the first of a seeded shuffle for training, the last for holding out,
    so that one direction's training pairs and the other direction's held-out pairs never meet."""
    records = load_records(str(source), "comparison", format="hh-rlhf", skip_invalid=True).records
    random.Random(seed).shuffle(records)
    return records[-count:] if held_out else records[:count]


def top_layers(layers: int) -> list[str]:
    total = json.loads((Path(resolve_model(EMBEDDED_MODEL, STORE).path) / "config.json").read_text())[
        "num_hidden_layers"
    ]
    return [f"layers.{i}.{name}" for i in range(total - layers, total) for name in PROJECTIONS]


def settings_of(variant: str) -> tuple[str, dict]:
    name, _, spec = variant.partition(":")
    settings = json.loads(json.dumps(BASE_SETTINGS))
    for pair in filter(None, spec.split(",")):
        key, _, value = pair.partition("=")
        value = yaml.safe_load(value)
        if key == "lora_layers":
            settings["lora"]["target_modules"] = top_layers(int(value))
        elif "." in key:
            outer, inner = key.split(".", 1)
            settings.setdefault(outer, {})[inner] = value
        else:
            settings[key] = value
    return name, settings


def curve(run_dir: Path) -> dict[int, float]:
    """Step -> held-out pairwise accuracy, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "eval/accuracy" in accumulator.Tags()["scalars"]:
            points |= {e.step: e.value for e in accumulator.Scalars("eval/accuracy")}
    return points


def oasst_accuracy(artifact_id: str) -> tuple[float, int, float]:
    """Pairwise accuracy of the final model on every ranked OpenAssistant group, pairs, longer-reply rate."""
    reward = load_reward(artifact_id, STORE)
    groups = load_records(str(OASST), "comparison", format="oasst").records
    right = total = 0
    for group in groups:
        scores = reward.score(group["prompt"], group["completions"])
        for a, rank_a in enumerate(group["ranks"]):
            for b, rank_b in enumerate(group["ranks"]):
                if rank_a < rank_b:
                    right += scores[a] > scores[b]
                    total += 1
    return right / total, total, longer_reply_accuracy(groups)


def one_run(name: str, settings: dict, direction: str, args, work: Path) -> dict:
    source, target = direction.split(":")
    train = pairs(COLLECTIONS[source], args.train_pairs, held_out=False, seed=args.seed)
    held_out = pairs(COLLECTIONS[target], args.eval_pairs, held_out=True, seed=args.seed)
    folder = work / f"{name}-{source}-{target}"
    folder.mkdir(parents=True)
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(held_out, folder / "held_out.jsonl")
    steps = math.ceil(len(train) / settings["groups_per_batch"])
    overrides = settings | {
        "store": str(STORE.root),
        "data": str(folder / "train.jsonl"),
        "eval_data": str(folder / "held_out.jsonl"),
        "eval_every": max(steps // args.curve, 1) if args.curve else 0,
        "output_dir": str(folder / "runs"),
        "run_name": "reward",
        "seed": args.seed,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(overrides), encoding="utf-8")
    cfg = load_config(reward_train.Config, folder / "config.yaml", [])
    artifact = reward_train.run(cfg, STORE)
    accuracy = artifact.metrics["eval_accuracy"]
    low, high = wilson(accuracy * len(held_out), len(held_out))
    result = {
        "variant": name, "direction": direction, "train_pairs": len(train), "held_out_pairs": len(held_out),
        "accuracy": accuracy, "ci": [low, high], "longer_reply": longer_reply_accuracy(held_out),
        "train_seconds": artifact.metrics["train_seconds"], "artifact": artifact.id,
        "truncated_prompts": artifact.metrics["truncated_prompts"], "max_length": settings["max_length"],
        "curve": {step * settings["groups_per_batch"]: acc for step, acc in sorted(curve(Path(artifact.meta["run_dir"])).items())},
    }  # fmt: skip
    if args.oasst:
        result["oasst"], result["oasst_pairs"], result["oasst_longer_reply"] = oasst_accuracy(artifact.id)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["recipe"])
    parser.add_argument("--directions", nargs="+", default=["base:rs", "rs:base"])
    parser.add_argument("--train-pairs", type=int, default=600)
    parser.add_argument("--eval-pairs", type=int, default=400)
    parser.add_argument("--curve", type=int, default=4, help="evaluations during training (0: none)")
    parser.add_argument("--oasst", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default=os.environ.get("RLHF_STORE", str(REPO / "artifacts")))
    parser.add_argument("--out", help="append each result to this JSON-lines file")
    args = parser.parse_args()
    global STORE
    STORE = ArtifactStore(args.store)
    for name, source in COLLECTIONS.items():
        sample = pairs(source, 300, held_out=False, seed=args.seed)
        print(f"{name}: tokens per sequence (prompt + reply) p50/p90/p99: {length_percentiles(sample)}")
    print(
        "variant      direction  pairs  accuracy (95% CI)      longer reply  train s  cut  curve (pairs: accuracy)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            name, settings = settings_of(variant)
            for direction in args.directions:
                r = one_run(name, settings, direction, args, Path(tmp))
                points = "  ".join(f"{n}: {a:.3f}" for n, a in r["curve"].items())
                print(f"{name:<12} {direction:<9} {r['train_pairs']:>6}  {r['accuracy']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f})"
                      f"  {r['longer_reply']:>12.3f}  {r['train_seconds']:>7.0f}  {r['truncated_prompts']:>4}  {points}", flush=True)  # fmt: skip
                if args.oasst:
                    print(f"{'':<12} OpenAssistant K=2..9: {r['oasst']:.3f} on {r['oasst_pairs']} pairs "
                          f"(longer reply {r['oasst_longer_reply']:.3f})", flush=True)  # fmt: skip
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(r) + "\n")


STORE: ArtifactStore


if __name__ == "__main__":
    main()
