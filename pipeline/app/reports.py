"""Figures for the Progress and Admin tabs and `rlhf label status`: counts, queue states, whose labels.

Every function reads one snapshot of the database. `labels_of` is the one place another annotator's
labels can be read, and it refuses anyone but an admin.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timezone
from typing import Any

from pipeline.app.db import LabelDB, LabelError
from pipeline.app.tasks import ranks_from_tiers
from pipeline.app.users import User

COUNTS = """
SELECT u.name AS user,
  (SELECT COUNT(*) FROM live_labels AS l WHERE l.user = u.name AND l.kind = 'ranking') AS rankings,
  (SELECT COUNT(*) FROM live_labels AS l WHERE l.user = u.name AND l.kind = 'demonstration') AS demonstrations,
  (SELECT COUNT(*) FROM live_labels AS l WHERE l.user = u.name AND l.kind = 'prompt') AS prompts,
  (SELECT COUNT(*) FROM labels AS l JOIN retractions AS r ON r.label_id = l.id
     WHERE l.user = u.name AND r.reason = 'undo') AS undone,
  (SELECT COUNT(*) FROM labels AS l JOIN retractions AS r ON r.label_id = l.id
     WHERE l.user = u.name AND r.reason != 'undo') AS discarded
FROM users AS u
"""


def progress(db: LabelDB, user: str | None = None) -> list[dict[str, Any]]:
    """Per annotator (or just `user`): live labels by kind, undone and discarded ones, median seconds."""
    where = " WHERE u.name = ?" if user is not None else ""
    with db.read() as conn:
        rows = [dict(r) for r in conn.execute(COUNTS + where + " ORDER BY u.name", (user,) if user else ())]
        for row in rows:
            seconds = [
                r[0]
                for r in conn.execute(
                    "SELECT seconds FROM live_labels WHERE user = ? AND kind = 'ranking' AND seconds IS NOT NULL",
                    (row["user"],),
                )
            ]
            row["median_seconds_per_ranking"] = round(statistics.median(seconds), 1) if seconds else None
    return rows


def queue_summary(db: LabelDB, now: float | None = None) -> list[dict[str, Any]]:
    """Per task kind: tasks waiting (untouched), in progress (some labels or leases), done; labels wanted."""
    now = time.time() if now is None else now
    with db.read() as conn:
        rows = conn.execute(
            """
            SELECT kind,
              COUNT(*) AS tasks,
              SUM(labelled = 0 AND leased = 0) AS waiting,
              SUM(labelled < overlap AND (labelled > 0 OR leased > 0)) AS in_progress,
              SUM(labelled >= overlap) AS done,
              SUM(labelled) AS labels,
              SUM(overlap) AS labels_wanted
            FROM (SELECT t.*, (SELECT COUNT(*) FROM leases AS s WHERE s.task_id = t.id AND s.closed IS NULL
                               AND s.expires > ?) AS leased FROM tasks AS t)
            GROUP BY kind ORDER BY kind
            """,
            (now,),
        ).fetchall()
    return [dict(r) for r in rows]


def live_rankings(db: LabelDB) -> dict[int, dict[str, list[int]]]:
    """task -> {annotator: ranks} over the live ranking labels."""
    rankings: dict[int, dict[str, list[int]]] = {}
    with db.read() as conn:
        for row in conn.execute("SELECT task_id, user, body FROM live_labels WHERE kind = 'ranking'"):
            rankings.setdefault(row["task_id"], {})[row["user"]] = ranks_from_tiers(
                json.loads(row["body"])["tiers"]
            )
    return rankings


def labels_of(db: LabelDB, viewer: User, name: str, limit: int = 50) -> list[dict[str, Any]]:
    """`name`'s newest labels, for `name` themselves or an admin; anyone else is refused."""
    if viewer.name != name and not viewer.is_admin:
        raise LabelError("only admins can see other annotators' labels")
    with db.read() as conn:
        rows = conn.execute(
            "SELECT l.id, l.kind, l.task_id, l.body, l.created, r.reason AS retracted FROM labels AS l "
            "LEFT JOIN retractions AS r ON r.label_id = l.id WHERE l.user = ? ORDER BY l.id DESC LIMIT ?",
            (name, limit),
        ).fetchall()
    return [
        {
            "label": row["id"],
            "kind": row["kind"],
            "task": row["task_id"],
            "summary": summary(row["kind"], json.loads(row["body"])),
            "submitted": datetime.fromtimestamp(row["created"], timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "retracted": row["retracted"] or "",
        }
        for row in rows
    ]


def summary(kind: str, body: dict[str, Any]) -> str:
    """One line describing a label: tiers for a ranking, the first words for a dialogue or prompt."""
    if kind == "ranking":
        return (
            "tiers "
            + " ".join(str(t) for t in body["tiers"])
            + (f" - {body['note']}" if body["note"] else "")
        )
    messages = body.get("messages") or body.get("prompt") or []
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    turns = sum(m["role"] != "system" for m in messages)
    return f"{turns} turns: {first[:60]}"
