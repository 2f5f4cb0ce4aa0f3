"""`rlhf ppo report REF`: did the run help? The evaluation curves and the replies side by side.

    rlhf ppo report ppo:latest [--store ROOT] [--pairs 3] [--width 100]

For each evaluation set: per evaluated step, the proxy's (the reward PPO optimised) and the judge's win
rate over SFT with the gap between them, the mean score, the KL to SFT and the reply length; a sparkline
of each win rate; then the last evaluation's replies of the policy and of SFT to the first prompts,
side by side with both reward models' scores. A proxy win rate that climbs while the judge's does not is
a reward model being gamed, not an assistant getting better.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

from pipeline.store import ArtifactStore, StoreError, default_store_root

SPARK = "▁▂▃▄▅▆▇█"
COLUMNS = [("win", "proxy win"), ("judge_win", "judge win"), ("win_gap", "gap"), ("score", "score"),
           ("kl", "KL"), ("length", "tokens"), ("words", "words"), ("no_stop", "no stop")]  # fmt: skip


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf ppo report", description=__doc__.split("\n")[0])
    parser.add_argument("ref", help="a ppo artifact: id, ppo:latest, or its folder")
    parser.add_argument("--store", default=default_store_root())
    parser.add_argument("--pairs", type=int, default=3, help="replies side by side per set")
    parser.add_argument("--width", type=int, default=100, help="characters per line")
    args = parser.parse_args(argv)
    store = ArtifactStore(args.store)
    artifact = store.resolve(args.ref, stage="ppo")
    folder = store.local_path(artifact)
    history = read_jsonl(folder / "metrics.jsonl")
    pairs = read_jsonl(folder / "eval_pairs.jsonl") if (folder / "eval_pairs.jsonl").is_file() else []
    print(f"{artifact.id}: {len([h for h in history if 'score' in h])} steps")
    print(render(history, pairs, pairs_per_set=args.pairs, width=args.width))
    return 0


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise StoreError(f"{path.parent} has no {path.name}: not a ppo artifact this version wrote")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def render(history: list[dict], pairs: list[dict], *, pairs_per_set: int, width: int) -> str:
    """The whole report as text (pure: tested on hand-made histories)."""
    prefixes = sorted({key.rsplit("/", 1)[0] for row in history for key in row if key.startswith("eval/")})
    if not prefixes:
        return "no evaluation in this run (eval_prompts was null)"
    blocks = []
    for prefix in prefixes:
        name = prefix.removeprefix("eval").strip("/") or "held-out prompts"
        rows = [h for h in history if f"{prefix}/score" in h]
        shown = [(key, title) for key, title in COLUMNS if any(f"{prefix}/{key}" in r for r in rows)]
        lines = [f"== {name} ==", "step " + " ".join(f"{title:>10}" for _, title in shown)]
        for row in rows:
            cells = [cell(row.get(f"{prefix}/{key}")) for key, _ in shown]
            lines.append(f"{row['step']:>4} " + " ".join(f"{c:>10}" for c in cells))
        for key, title in shown[:2]:
            lines.append(f"{title:>10}: {sparkline([r.get(f'{prefix}/{key}') for r in rows])}")
        last = rows[-1]
        if f"{prefix}/judge_win" in last and rows[0].get(f"{prefix}/judge_win") is not None:
            lines.append(verdict(rows[0], last, prefix))
        set_name = prefix.removeprefix("eval").strip("/")
        for pair in [p for p in pairs if p["set"] == set_name][:pairs_per_set]:
            lines += side_by_side(pair, width)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def sparkline(values: list[float | None]) -> str:
    """Win rates in [0, 1] as block characters, one per evaluation."""
    return "".join(" " if v is None else SPARK[min(int(v * len(SPARK)), len(SPARK) - 1)] for v in values)


def verdict(first: dict, last: dict, prefix: str) -> str:
    proxy = last[f"{prefix}/win"] - first[f"{prefix}/win"]
    judge = last[f"{prefix}/judge_win"] - first[f"{prefix}/judge_win"]
    if proxy > 0 and judge <= 0:
        return (
            f"the proxy's win rate rose by {proxy:+.3f} while the judge's moved {judge:+.3f}: over-optimised"
        )
    return f"win rate moved {proxy:+.3f} by the proxy and {judge:+.3f} by the judge"


def side_by_side(pair: dict, width: int) -> list[str]:
    """The prompt, then the policy's and SFT's replies in two columns with their scores."""
    column = (width - 3) // 2
    prompt = pair["prompt"][-1]["content"]
    lines = ["", textwrap.shorten(f"prompt: {prompt}", width=width)]
    heads = [f"PPO  proxy {pair['policy']['proxy']:+.2f}" + judged(pair["policy"]),
             f"SFT  proxy {pair['sft']['proxy']:+.2f}" + judged(pair["sft"])]  # fmt: skip
    left, right = (textwrap.wrap(pair[side]["text"] or "(empty)", column) for side in ("policy", "sft"))
    lines.append(f"{heads[0]:<{column}} | {heads[1]}")
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        lines.append(f"{a:<{column}} | {b}")
    return lines


def judged(reply: dict) -> str:
    return "" if reply.get("judge") is None else f"  judge {reply['judge']:+.2f}"
