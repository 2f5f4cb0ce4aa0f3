"""`rlhf label import`: prompts become writing tasks, comparison groups become ranking tasks.

A prompt file (any format pipeline.datasets reads as prompts) queues one writing task per prompt: a
trainer writes the reply. A comparison file queues one ranking task per group; its ranks, if it has
any, are not shown and not kept (people rank afresh). Canonical JSON-lines groups may leave `ranks`
out, and may carry `provenance` (one {"model", "artifact_id", "sampling"} per completion, as the
exported comparisons do), which is kept. `--kind prompt` reads any conversation or comparison file as
its prompts.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from pipeline.app.db import LabelError
from pipeline.app.tasks import MAX_K, Completion, NewTask
from pipeline.datasets import DataError, inspect_file, load_records, validate_comparison


def read_tasks(path: str, kind: str = "auto") -> list[NewTask]:
    """The tasks a file describes; `kind` is "prompt", "comparison" or "auto" (from its records)."""
    if kind == "auto":
        kind = inspect_file(path, None, skip_invalid=True, max_problems=0).kind or "unknown"
    if kind == "prompt":
        records = load_records(path, "prompt").records
        return [NewTask("write", r["prompt"], f"{path}:{i}") for i, r in enumerate(records, 1)]
    if kind == "comparison":
        groups = (
            read_groups(Path(path)) if is_canonical_jsonl(path) else load_records(path, "comparison").records
        )
        return [group_task(group, f"{path}:{i}") for i, group in enumerate(groups, 1)]
    if kind == "conversation":
        raise LabelError(
            f"{path} holds conversations, which are demonstrations already (`rlhf sft --data {path}` trains "
            "on them); to write new replies to their prompts, import it with --kind prompt"
        )
    raise LabelError(f"{path}: no readable record to tell prompts from comparisons; pass --kind")


def is_canonical_jsonl(path: str) -> bool:
    if not path.lower().endswith((".jsonl", ".jsonl.gz")):
        return False
    first = next(iter_json_lines(Path(path)), (0, {}))[1]
    return isinstance(first, dict) and "completions" in first


def iter_json_lines(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line, text in enumerate(handle, 1):
            if text.strip():
                try:
                    yield line, json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(path, line, "<json>", f"not valid JSON: {err.msg}") from None


def read_groups(path: Path) -> list[dict[str, Any]]:
    """Canonical comparison groups, ranks optional, each checked with the pipeline's own validator."""
    groups = []
    for line, record in iter_json_lines(path):
        if isinstance(record, dict) and "ranks" not in record and isinstance(record.get("completions"), list):
            record = {**record, "ranks": [0] * len(record["completions"])}
        groups.append(validate_comparison(record, file=path, line=line))
    return groups


def group_task(group: dict[str, Any], source: str) -> NewTask:
    if len(group["completions"]) > MAX_K:
        raise LabelError(
            f"{source}: {len(group['completions'])} completions; a ranking task holds at most {MAX_K}"
        )
    provenance = group.get("provenance")
    if not (
        isinstance(provenance, list)
        and len(provenance) == len(group["completions"])
        and all(isinstance(origin, dict) for origin in provenance)
    ):
        provenance = [{} for _ in group["completions"]]
    completions = [
        Completion(
            text=text,
            model=origin.get("model"),
            artifact_id=origin.get("artifact_id"),
            sampling=origin.get("sampling"),
        )
        for text, origin in zip(group["completions"], provenance, strict=True)
    ]
    return NewTask("rank", group["prompt"], source, completions)
