"""`rlhf label export`: publish the live labels as a `labels` artifact the stages train on.

The export reads a snapshot of the database (SQLite's online backup, taken in one step while the app
keeps running), so its files, counts and checksum all describe the same moment. The payload:

    comparisons.jsonl    one canonical comparison per submitted ranking (ties kept as equal ranks), with
                         the annotator's pseudonym, flags, note, shown order, seconds, and per completion
                         its provenance: the model and artifact that wrote it and the sampling settings;
                         and one per arena vote (K = 2, [left, right]): the better reply ranked 0, a tie
                         or "both bad" as equal ranks (no training pair), with `verdict` and `both_bad`
    conversations.jsonl  the demonstrations (canonical conversations)
    prompts.jsonl        prompts written in prompt-only mode (canonical prompts, for PPO)
    feedback.jsonl       chat thumbs up and down, in TRL's unpaired preference format (KTO's): `prompt`
                         (the conversation before the reply), `completion` (the reply as one assistant
                         message), `label` (true for up), with the model, artifact and sampling that wrote it
    parquet/             the same records as Parquet, plus every ranked pair in TRL's preference format,
                         with a dataset card: `datasets.load_dataset("<artifact>/parquet", "comparisons")`

A file is written only when it has records. Retracted labels (undone or discarded) are left out.
Annotators appear as `a-<10 hex>`: an HMAC of their name under a salt kept in the database, stable across
exports and not reversible without the database. The manifest lists the artifacts that generated the
completions as inputs (lineage), and records counts, agreement and the snapshot's sha256.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import tempfile
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.app.agreement import agreement_summary
from pipeline.app.db import LabelDB, LabelError
from pipeline.app.tasks import ranks_from_tiers
from pipeline.app.votes import ranks_of, vote_from_row
from pipeline.datasets import validate_comparison, validate_conversation, validate_prompt, write_jsonl
from pipeline.store import Artifact, ArtifactStore, file_sha256

PAYLOAD_NAMES = {
    "comparisons": "comparisons.jsonl",
    "conversations": "conversations.jsonl",
    "prompts": "prompts.jsonl",
    "feedback": "feedback.jsonl",
}


def export_labels(db: LabelDB, store: ArtifactStore) -> Artifact:
    """Publish the database's live labels as a new `labels` artifact in `store`."""
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / "snapshot.db"
        source, target = db.connect(), sqlite3.connect(snapshot)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        target = sqlite3.connect(snapshot)
        target.row_factory = sqlite3.Row
        try:
            records = read_records(target)
            last_label = target.execute("SELECT COALESCE(MAX(id), 0) FROM labels").fetchone()[0]
            retracted = target.execute("SELECT COUNT(*) FROM retractions").fetchone()[0]
        finally:
            target.close()
        if not any(records.values()):
            raise LabelError(f"nothing to export: {db.path} holds no submitted label that is not retracted")
        payload = Path(tmp) / "payload"
        files = write_payload(records, payload)
        rankings = [r for r in records["comparisons"] if r["task"] is not None]
        agreement = agreement_summary(rankings_by_task(rankings))
        metrics = {
            "comparisons": len(records["comparisons"]),
            "arena_votes": len(records["comparisons"]) - len(rankings),
            "conversations": len(records["conversations"]),
            "prompts": len(records["prompts"]),
            "chat_feedback": len(records["feedback"]),
            "preference_pairs": len(preference_pairs(records["comparisons"])),
            "annotators": len({r["annotator"] for rs in records.values() for r in rs}),
            "retracted_labels_left_out": retracted,
            "agreement_items": agreement["items"],
            "pairwise_agreement": agreement["pairwise_agreement"],
            "kendall_tau": agreement["kendall_tau"],
        }
        return store.publish(
            "labels",
            payload,
            config={"db": str(db.path)},
            inputs=lineage(records)
            + [{"dataset": str(db.path), "sha256": file_sha256(snapshot), "role": "labels"}],
            metrics=metrics,
            meta={
                "db_sha256": file_sha256(snapshot),
                "last_label_id": last_label,
                "files": files,
                "agreement_per_annotator": agreement["per_annotator"],
                "annotators": "pseudonyms: HMAC-SHA256 of the user name under the database's salt",
            },
        )


def read_records(conn: sqlite3.Connection) -> dict[str, list[dict[str, Any]]]:
    """The live labels as canonical records, oldest first, each checked by the pipeline's validators."""
    salt = conn.execute("SELECT value FROM meta WHERE key = 'pseudonym_salt'").fetchone()[0]
    records: dict[str, list[dict[str, Any]]] = {
        "comparisons": [],
        "conversations": [],
        "prompts": [],
        "feedback": [],
    }
    for row in conn.execute("SELECT * FROM live_labels ORDER BY id"):
        body = json.loads(row["body"])
        common = {
            "annotator": pseudonym(salt, row["user"]),
            "labelled_at": datetime.fromtimestamp(row["created"], timezone.utc).isoformat(timespec="seconds"),
        }
        if row["kind"] == "ranking":
            records["comparisons"].append(validate_comparison(comparison(conn, row, body) | common))
        elif row["kind"] == "demonstration":
            record = {
                "id": f"demonstration-{row['id']}",
                "messages": body["messages"],
                "task": row["task_id"],
                "suggested_by": body.get("suggested_by", []),
            }
            records["conversations"].append(validate_conversation(record | common))
        elif row["kind"] == "prompt":
            records["prompts"].append(
                validate_prompt({"id": f"prompt-{row['id']}", "prompt": body["prompt"]} | common)
            )
        elif row["kind"] == "arena_vote":
            records["comparisons"].append(validate_comparison(arena_comparison(row) | common))
        elif row["kind"] == "chat_feedback":
            records["feedback"].append(unpaired_preference(row["id"], body) | common)
    return records


def unpaired_preference(label_id: int, body: dict[str, Any]) -> dict[str, Any]:
    """A chat rating as one row of TRL's conversational unpaired preference format, with its provenance."""
    reply = body["reply"]
    return {
        "id": f"feedback-{label_id}",
        "prompt": body["prompt"],
        "completion": [{"role": "assistant", "content": reply["text"]}],
        "label": body["rating"] == "up",
        "model": reply["model"],
        "artifact_id": reply["artifact_id"],
        "sampling": reply["sampling"],
    }


def comparison(conn: sqlite3.Connection, row: sqlite3.Row, body: dict[str, Any]) -> dict[str, Any]:
    task = conn.execute("SELECT prompt FROM tasks WHERE id = ?", (row["task_id"],)).fetchone()
    completions = conn.execute(
        "SELECT text, model, artifact_id, sampling FROM completions WHERE task_id = ? ORDER BY position",
        (row["task_id"],),
    ).fetchall()
    return {
        "id": f"ranking-{row['id']}",
        "prompt": json.loads(task["prompt"]),
        "completions": [c["text"] for c in completions],
        "ranks": ranks_from_tiers(body["tiers"]),
        "task": row["task_id"],
        "flags": body["flags"],
        "note": body["note"],
        "shown_order": json.loads(row["shown_order"]),
        "seconds": round(row["seconds"], 1),
        "provenance": [
            {
                "model": c["model"],
                "artifact_id": c["artifact_id"],
                "sampling": json.loads(c["sampling"] or "null"),
            }
            for c in completions
        ],
    }


def arena_comparison(row: sqlite3.Row) -> dict[str, Any]:
    """A vote as a K = 2 comparison, [left, right], with the same fields as a ranking's (no task, no flags)."""
    vote = vote_from_row(row)
    sides = (vote.left, vote.right)
    return {
        "id": f"arena-{vote.label_id}",
        "prompt": vote.prompt,
        "completions": [reply.text for reply in sides],
        "ranks": ranks_of(vote.verdict),
        "task": None,
        "flags": [[], []],
        "note": "",
        "shown_order": [0, 1],
        "seconds": None if vote.seconds is None else round(vote.seconds, 1),
        "provenance": [
            {"model": reply.model, "artifact_id": reply.artifact_id, "sampling": reply.sampling}
            for reply in sides
        ],
        "verdict": vote.verdict,
        "both_bad": vote.verdict == "both_bad",
        "arena_mode": vote.mode,
    }


def pseudonym(salt: str, user: str) -> str:
    return "a-" + hmac.new(salt.encode(), user.encode(), hashlib.sha256).hexdigest()[:10]


def rankings_by_task(comparisons: list[dict[str, Any]]) -> dict[int, dict[str, list[int]]]:
    by_task: dict[int, dict[str, list[int]]] = {}
    for record in comparisons:
        by_task.setdefault(record["task"], {})[record["annotator"]] = record["ranks"]
    return by_task


def preference_pairs(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ranked pair (ties give none) in TRL's conversational preference format."""
    pairs = []
    for record in comparisons:
        for i, j in combinations(range(len(record["completions"])), 2):
            if record["ranks"][i] == record["ranks"][j]:
                continue
            better, worse = (i, j) if record["ranks"][i] < record["ranks"][j] else (j, i)
            pairs.append(
                {
                    "id": f"{record['id']}-{better}-{worse}",
                    "prompt": record["prompt"],
                    "chosen": [{"role": "assistant", "content": record["completions"][better]}],
                    "rejected": [{"role": "assistant", "content": record["completions"][worse]}],
                }
            )
    return pairs


def lineage(records: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The models behind the exported completions and suggestions, as manifest inputs."""
    inputs: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records["comparisons"]:
        for origin in record["provenance"]:
            if origin["artifact_id"]:
                inputs[("artifact", origin["artifact_id"])] = {
                    "artifact": origin["artifact_id"],
                    "role": "completions",
                }
            elif origin["model"]:
                inputs[("model", origin["model"])] = {"model": origin["model"], "role": "completions"}
    for record in records["feedback"]:
        if record["artifact_id"]:
            inputs[("artifact", record["artifact_id"])] = {
                "artifact": record["artifact_id"],
                "role": "completions",
            }
    for record in records["conversations"]:
        for artifact_id in record["suggested_by"]:
            inputs.setdefault(("artifact", artifact_id), {"artifact": artifact_id, "role": "suggestions"})
    return [inputs[key] for key in sorted(inputs)]


def same_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column (null where it has none): Arrow takes the columns from the first row,
    and a ranking first would otherwise drop the arena votes' `verdict` and `both_bad`."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key) for key in columns} for row in rows]


def write_payload(records: dict[str, list[dict[str, Any]]], payload: Path) -> dict[str, int]:
    """JSON lines, Parquet and a dataset card for each non-empty record kind; the row count per file."""
    tables = {name: rows for name, rows in records.items() if rows}
    if records["comparisons"]:
        tables["preference_pairs"] = preference_pairs(records["comparisons"])
    (payload / "parquet").mkdir(parents=True)
    files = {}
    for name, rows in tables.items():
        if name in PAYLOAD_NAMES:
            write_jsonl(rows, payload / PAYLOAD_NAMES[name])
            files[PAYLOAD_NAMES[name]] = len(rows)
        pq.write_table(pa.Table.from_pylist(same_columns(rows)), payload / "parquet" / f"{name}.parquet")
        files[f"parquet/{name}.parquet"] = len(rows)
    configs = "".join(f"- config_name: {name}\n  data_files: {name}.parquet\n" for name in tables)
    (payload / "parquet" / "README.md").write_text(
        f"---\nconfigs:\n{configs}---\n\n# Labels exported from the rlhf-pipeline labelling app\n\n"
        "Configs: " + ", ".join(f"`{name}`" for name in tables) + ". `comparisons` are K-wise rankings "
        "(lower rank is better, equal ranks are ties) and arena votes (K = 2, `verdict`, `both_bad`); "
        "`preference_pairs` expands them into TRL's "
        "prompt/chosen/rejected format; `conversations` are demonstrations; `prompts` are prompts; `feedback` holds chat "
        "thumbs in TRL's unpaired prompt/completion/label format.\n",
        encoding="utf-8",
    )
    return files
