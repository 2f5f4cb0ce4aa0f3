"""`rlhf reward score`: print what a reward model thinks of some completions, raw and normalised.

    rlhf reward score --artifact reward:latest --prompt "How do I boil an egg?" \\
        --completion "Six minutes, then ice water." --completion "Eggs are versatile! ..."
    rlhf reward score --artifact reward:latest --file data/demo/comparisons.jsonl --limit 5

`--file` takes ranked comparisons (any format pipeline.datasets converts, e.g. canonical or hh-rlhf) or
JSON lines of {"prompt": str | messages, "completion": str}. Normalised = (raw - reward_mean) / reward_std
over the SFT demonstrations, so 0 is "as good as a typical demonstration". With ranks in the file, the
last line says how many ranked pairs the model orders the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.chat import Message
from pipeline.cli import Parser
from pipeline.datasets import load_records, validate_prompt
from pipeline.scoring import load_reward
from pipeline.store import ArtifactStore, default_store_root


@dataclass
class Item:
    """One prompt and the completions to score; ranks when the source has them."""

    prompt: list[Message]
    completions: list[str]
    ranks: list[int] | None = None


def main(argv: Sequence[str]) -> int:
    parser = Parser(prog="rlhf reward score", description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", required=True, help="reward artifact: id, reward:latest, or a folder")
    parser.add_argument("--store", default=default_store_root())
    parser.add_argument("--prompt", help="one user message")
    parser.add_argument("--completion", action="append", default=[], help="a reply to score (repeatable)")
    parser.add_argument("--file", help="comparisons, or JSON lines of {prompt, completion}")
    parser.add_argument("--format", default="auto", help="format of --file (auto, canonical, hh-rlhf, ...)")
    parser.add_argument("--limit", type=int, help="score only the first N records of --file")
    args = parser.parse_args(argv)
    if bool(args.file) == bool(args.prompt):
        parser.error("give either --prompt with --completion ..., or --file")
    if args.prompt and not args.completion:
        parser.error("--prompt needs at least one --completion")

    reward = load_reward(args.artifact, ArtifactStore(args.store))
    if args.file:
        items = read_items(args.file, args.format, args.limit)
    else:
        items = [Item([{"role": "user", "content": args.prompt}], list(args.completion))]

    agree = pairs = 0
    for item in items:
        raw = reward.score(item.prompt, item.completions)
        print(f"prompt: {shorten(item.prompt[-1]['content'], 100)}")
        print(f"  {'raw':>8} {'normalised':>10} {'rank':>4}  completion")
        for i, (completion, score) in enumerate(zip(item.completions, raw, strict=True)):
            rank = "" if item.ranks is None else str(item.ranks[i])
            print(f"  {score:8.3f} {reward.normalise(score):10.3f} {rank:>4}  {shorten(completion, 80)}")
        if item.ranks is not None:
            for b, rank_b in enumerate(item.ranks):
                for w, rank_w in enumerate(item.ranks):
                    if rank_b < rank_w:
                        pairs += 1
                        agree += raw[b] > raw[w]
    if pairs:
        print(f"ranked pairs ordered as in the file: {agree}/{pairs} ({agree / pairs:.1%})")
    return 0


def read_items(path: str, format: str, limit: int | None) -> list[Item]:
    """Comparisons through the loaders, or prompt/completion lines (consecutive equal prompts grouped)."""
    first = first_record(Path(path))
    if isinstance(first, dict) and "completion" in first:
        items: list[Item] = []
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                prompt = validate_prompt({"prompt": record["prompt"]}, file=path, line=line_no)["prompt"]
                if items and items[-1].prompt == prompt:
                    items[-1].completions.append(record["completion"])
                else:
                    items.append(Item(prompt, [record["completion"]]))
        return items[:limit]
    loaded = load_records(path, "comparison", format=format, limit=limit)
    return [Item(r["prompt"], r["completions"], r["ranks"]) for r in loaded.records]


def first_record(path: Path) -> object:
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
