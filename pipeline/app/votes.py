"""Arena votes and chat feedback: two more label kinds in the label database's append-only `labels` table.

Label bodies (JSON in `labels.body`; `task_id` is NULL, since neither comes from the task queue):

    arena_vote     {"prompt": [messages ending with a user turn], "mode": "anonymous" | "named",
                    "left": Reply, "right": Reply, "verdict": "left" | "right" | "tie" | "both_bad"}
    chat_feedback  {"prompt": [the conversation before the rated reply], "reply": Reply, "rating": "up" | "down"}

    Reply = {"text": str, "model": source as given, "artifact_id": str | None, "sampling": {...} | None}

"left" and "right" are the sides the voter saw. A vote is checked as a K = 2 comparison by the pipeline's
own validator before it is stored, so every stored vote exports (an empty reply cannot be voted on).
Submissions are idempotent by key, as every label is: the arena issues one key per round, so a second
click, or a vote from a second tab on the same round, returns the stored vote and changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.app.db import LabelDB, LabelError
from pipeline.app.tasks import Submitted, retract, stored_submission
from pipeline.datasets import DataError, validate_comparison, validate_prompt

VERDICTS = ("left", "right", "tie", "both_bad")
MODES = ("anonymous", "named")
RATINGS = ("up", "down")
MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class Reply:
    """One model's reply, with what made it."""

    text: str
    model: str
    """The model source as given (an artifact reference, a folder, ...)."""
    artifact_id: str | None = None
    """The artifact it resolved to; None for a plain folder or Hub id."""
    sampling: dict[str, Any] | None = None
    """temperature, top_p, max_new_tokens, seed."""

    @property
    def player(self) -> str:
        """Who this reply counts for on the leaderboard: the artifact, else the source as given."""
        return self.artifact_id or self.model


@dataclass(frozen=True)
class ArenaVote:
    """A stored (live) vote, as the leaderboard and the export read it."""

    label_id: int
    user: str
    prompt: list[dict]
    left: Reply
    right: Reply
    verdict: str
    mode: str
    seconds: float | None
    created: float


def check_key(key: str) -> None:
    if len(key) < MIN_KEY_LENGTH:
        raise LabelError("invalid submission key: reload the page")


def record_arena_vote(
    db: LabelDB,
    user: str,
    key: str,
    prompt: list[dict],
    left: Reply,
    right: Reply,
    verdict: str,
    *,
    mode: str = "anonymous",
    seconds: float | None = None,
    now: float | None = None,
) -> Submitted:
    """Store one vote on a round (idempotent by `key`); refused unless it exports as a comparison."""
    now = time.time() if now is None else now
    check_key(key)
    if verdict not in VERDICTS:
        raise LabelError(f"unknown verdict {verdict!r}: one of {', '.join(VERDICTS)}")
    if mode not in MODES:
        raise LabelError(f"unknown arena mode {mode!r}: one of {', '.join(MODES)}")
    try:
        validate_comparison({"prompt": prompt, "completions": [left.text, right.text], "ranks": [0, 0]})
    except DataError as err:
        side = {"completions[0]": "the left reply", "completions[1]": "the right reply"}.get(
            err.field, err.field
        )
        raise LabelError(f"this round cannot be voted on: {side}: {err.message}; start a new round") from None
    body = {"prompt": prompt, "mode": mode, "left": asdict(left), "right": asdict(right), "verdict": verdict}
    return append_label(db, user, key, "arena_vote", body, seconds=seconds, now=now)


def record_chat_feedback(
    db: LabelDB,
    user: str,
    key: str,
    prompt: list[dict],
    reply: Reply,
    rating: str,
    *,
    replaces: int | None = None,
    now: float | None = None,
) -> Submitted:
    """Store a thumbs up or down on a chat reply (idempotent by `key`).

    `prompt` is the conversation the reply answers (ending with a user turn). To change a rating, call
    again with a new key and `replaces` set to the earlier label's id: that label is retracted in the same
    transaction, so one reply never holds two live ratings from one person.
    """
    now = time.time() if now is None else now
    check_key(key)
    if rating not in RATINGS:
        raise LabelError(f"unknown rating {rating!r}: one of {', '.join(RATINGS)}")
    try:
        prompt = validate_prompt({"prompt": prompt})["prompt"]
    except DataError as err:
        raise LabelError(f"{err.field}: {err.message}") from None
    body = {"prompt": prompt, "reply": asdict(reply), "rating": rating}
    with db.write() as conn:
        stored = stored_submission(conn, user, key)
        if stored is not None:
            return stored
        if replaces is not None:
            earlier = conn.execute(
                "SELECT * FROM live_labels WHERE id = ? AND user = ? AND kind = 'chat_feedback'",
                (replaces, user),
            ).fetchone()
            if earlier is not None:
                retract(conn, earlier, by_user=user, reason="changed", now=now)
        return insert_label(conn, db, user, key, "chat_feedback", body, seconds=None, now=now)


def append_label(
    db: LabelDB, user: str, key: str, kind: str, body: dict, *, seconds: float | None, now: float
) -> Submitted:
    with db.write() as conn:
        stored = stored_submission(conn, user, key)  # a repeated click, or the same round voted twice
        if stored is not None:
            return stored
        return insert_label(conn, db, user, key, kind, body, seconds=seconds, now=now)


def insert_label(
    conn: sqlite3.Connection,
    db: LabelDB,
    user: str,
    key: str,
    kind: str,
    body: dict,
    *,
    seconds: float | None,
    now: float,
) -> Submitted:
    cursor = conn.execute(
        "INSERT INTO labels (key, kind, task_id, user, body, shown_order, seconds, app_version, created) "
        "VALUES (?, ?, NULL, ?, ?, NULL, ?, ?, ?)",
        (key, kind, user, json.dumps(body, ensure_ascii=False), seconds, db.app_version, now),
    )
    return Submitted(cursor.lastrowid, key, duplicate=False)


def vote_from_row(row: sqlite3.Row) -> ArenaVote:
    body = json.loads(row["body"])
    return ArenaVote(
        label_id=row["id"],
        user=row["user"],
        prompt=body["prompt"],
        left=Reply(**body["left"]),
        right=Reply(**body["right"]),
        verdict=body["verdict"],
        mode=body["mode"],
        seconds=row["seconds"],
        created=row["created"],
    )


def arena_votes(db: LabelDB) -> list[ArenaVote]:
    """Every live (not undone or discarded) arena vote, oldest first."""
    with db.read() as conn:
        rows = conn.execute("SELECT * FROM live_labels WHERE kind = 'arena_vote' ORDER BY id").fetchall()
    return [vote_from_row(row) for row in rows]


def ranks_of(verdict: str) -> list[int]:
    """The comparison record's ranks for [left, right]: the better reply 0; a tie or both bad, equal."""
    return {"left": [0, 1], "right": [1, 0], "tie": [0, 0], "both_bad": [0, 0]}[verdict]


def players(votes: Sequence[ArenaVote]) -> list[str]:
    """Every model that has a vote, sorted."""
    return sorted({vote.left.player for vote in votes} | {vote.right.player for vote in votes})
