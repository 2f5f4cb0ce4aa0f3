"""The task queue: adding tasks, leasing them to annotators, and storing each submission exactly once.

The rules every function here keeps, each inside one write transaction (pipeline.app.db):

- A task wants `overlap` labels, each from a different annotator. It is leased only while its live
  labels plus its open, unexpired leases are fewer than that, never twice at once to one annotator, and
  never to someone who skipped it or holds a label on it (except one they undid themselves: undo
  exists to redo a task).
- A lease carries the idempotency key of the one submission it allows. Submitting a key that is already
  stored returns that label again (a retried or double-clicked submit stores one row). A lease that
  expired may still be submitted while the task has room; once its place went to someone else it may not.
- Nothing is deleted: undo and an admin's discard append a retraction, and the task's place reopens.

Label bodies (JSON in `labels.body`):
    ranking        {"tiers": [int per completion position], "flags": [[str, ...] per position], "note": str}
    demonstration  {"messages": [...], "suggested_by": [artifact ids whose suggestions were edited]}
    prompt         {"prompt": [...]}
Tiers count from 1 (best); equal tiers are ties. `ranks_from_tiers` turns them into the comparison
record's ranks.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.app.db import LabelDB, LabelError
from pipeline.datasets import DataError, validate_conversation, validate_prompt

MAX_K = 9  # completions per ranking task: one digit key per tier
FLAGS = ("harmful", "untruthful", "not English", "not rankable")
LEASE_SECONDS = 30 * 60
SLOT_NAMES = "ABCDEFGHI"


@dataclass(frozen=True)
class Completion:
    text: str
    model: str | None = None
    """The model source that wrote it, as given (None: imported without one)."""
    artifact_id: str | None = None
    """The artifact that model source resolved to."""
    sampling: dict[str, Any] | None = None
    """temperature, top_p, max_new_tokens, seed, engine."""


@dataclass(frozen=True)
class NewTask:
    kind: str
    """"rank" (judge the completions) or "write" (write the reply to the prompt)."""
    prompt: list[dict]
    """Messages ending with a user turn."""
    source: str
    """Where it came from: file:line, or the generate run."""
    completions: list[Completion] = field(default_factory=list)


@dataclass(frozen=True)
class Lease:
    """A task handed to one annotator, in the order they see it."""

    key: str
    task_id: int
    kind: str
    prompt: list[dict]
    shown: list[str]
    """Completion texts in the order shown."""
    shown_order: list[int]
    """Shown slot -> completion position."""
    issued: float
    expires: float
    previous: dict[str, Any] | None = None
    """After an undo: the undone label's tiers, flags and note, by shown slot, to start from."""


@dataclass(frozen=True)
class Submitted:
    label_id: int
    key: str
    duplicate: bool
    """True when this key was stored before: nothing new was written."""


def add_tasks(db: LabelDB, tasks: Sequence[NewTask], overlap: int = 1) -> list[int]:
    """Queue `tasks`, each wanting `overlap` labels; returns their ids."""
    if overlap < 1:
        raise LabelError(f"--overlap must be at least 1, got {overlap}")
    for task in tasks:
        check_task(task)
    now = time.time()
    ids = []
    with db.write() as conn:
        for task in tasks:
            cursor = conn.execute(
                "INSERT INTO tasks (kind, prompt, overlap, source, created) VALUES (?, ?, ?, ?, ?)",
                (task.kind, json.dumps(task.prompt, ensure_ascii=False), overlap, task.source, now),
            )
            task_id = cursor.lastrowid
            conn.executemany(
                "INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        task_id,
                        i,
                        c.text,
                        c.model,
                        c.artifact_id,
                        json.dumps(c.sampling) if c.sampling else None,
                    )
                    for i, c in enumerate(task.completions)
                ],
            )
            ids.append(task_id)
    return ids


def check_task(task: NewTask) -> None:
    try:
        validate_prompt({"prompt": task.prompt}, file=task.source)
    except DataError as err:
        raise LabelError(str(err)) from None
    k = len(task.completions)
    if task.kind == "rank" and not 2 <= k <= MAX_K:
        raise LabelError(f"{task.source}: a ranking task needs 2 to {MAX_K} completions, got {k}")
    if task.kind == "rank" and any(not c.text.strip() for c in task.completions):
        raise LabelError(f"{task.source}: empty completion: a ranking task shows only replies with text")
    if task.kind == "write" and k:
        raise LabelError(f"{task.source}: a writing task has a prompt and no completions")
    if task.kind not in ("rank", "write"):
        raise LabelError(f"unknown task kind {task.kind!r}")


# -- leasing ---------------------------------------------------------------------------------------

# Tasks `:user` may take now, oldest first (see the module docstring for the rules).
NEXT_TASK = """
SELECT t.id FROM tasks AS t
WHERE t.kind = :kind AND t.labelled < t.overlap
  AND t.labelled + (SELECT COUNT(*) FROM leases AS s
                    WHERE s.task_id = t.id AND s.closed IS NULL AND s.expires > :now) < t.overlap
  AND NOT EXISTS (SELECT 1 FROM leases AS s WHERE s.task_id = t.id AND s.user = :user
                  AND (s.outcome = 'skipped' OR (s.closed IS NULL AND s.expires > :now)))
  AND NOT EXISTS (SELECT 1 FROM labels AS l WHERE l.task_id = t.id AND l.user = :user
                  AND NOT EXISTS (SELECT 1 FROM retractions AS r
                                  WHERE r.label_id = l.id AND r.by_user = l.user AND r.reason = 'undo'))
ORDER BY t.id LIMIT 1
"""


def lease(
    db: LabelDB, user: str, kind: str, *, lease_seconds: float = LEASE_SECONDS, now: float | None = None
) -> Lease | None:
    """The annotator's current task of `kind`, or the next one for them; None when none is left."""
    now = time.time() if now is None else now
    with db.write() as conn:
        held = conn.execute(
            "SELECT s.key FROM leases AS s JOIN tasks AS t ON t.id = s.task_id WHERE s.user = ? AND t.kind = ? "
            "AND s.closed IS NULL AND s.expires > ? ORDER BY s.issued, s.key LIMIT 1",
            (user, kind, now),
        ).fetchone()
        if held is not None:
            return load_lease(conn, held["key"])
        task = conn.execute(NEXT_TASK, {"kind": kind, "user": user, "now": now}).fetchone()
        if task is None:
            return None
        key = issue(conn, task["id"], user, now=now, lease_seconds=lease_seconds)
        return None if key is None else load_lease(conn, key)


def issue(
    conn: sqlite3.Connection,
    task_id: int,
    user: str,
    *,
    now: float,
    lease_seconds: float,
    replaces: int | None = None,
) -> str | None:
    """Lease the task to `user` if it has room (inside the caller's write transaction); the new key."""
    task = conn.execute("SELECT labelled, overlap FROM tasks WHERE id = ?", (task_id,)).fetchone()
    holders = conn.execute(
        "SELECT COUNT(*) FROM leases WHERE task_id = ? AND closed IS NULL AND expires > ?", (task_id, now)
    ).fetchone()[0]
    if task["labelled"] + holders >= task["overlap"]:
        return None
    k = conn.execute("SELECT COUNT(*) FROM completions WHERE task_id = ?", (task_id,)).fetchone()[0]
    order = shown_order(task_id, user, k)
    key = secrets.token_urlsafe(16)
    conn.execute(
        "INSERT INTO leases (key, task_id, user, shown_order, issued, expires, replaces) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (key, task_id, user, json.dumps(order), now, now + lease_seconds, replaces),
    )
    return key


def shown_order(task_id: int, user: str, k: int) -> list[int]:
    """The order one annotator sees a task's completions in: shuffled, the same each time they see it."""
    order = list(range(k))
    random.Random(f"{task_id}/{user}").shuffle(order)
    return order


def load_lease(conn: sqlite3.Connection, key: str) -> Lease:
    row = conn.execute(
        "SELECT s.*, t.kind, t.prompt FROM leases AS s JOIN tasks AS t ON t.id = s.task_id WHERE s.key = ?",
        (key,),
    ).fetchone()
    texts = [
        r["text"]
        for r in conn.execute(
            "SELECT text FROM completions WHERE task_id = ? ORDER BY position", (row["task_id"],)
        )
    ]
    order = json.loads(row["shown_order"])
    previous = None
    if row["replaces"] is not None:
        body = json.loads(
            conn.execute("SELECT body FROM labels WHERE id = ?", (row["replaces"],)).fetchone()[0]
        )
        previous = shown_view(body, order) if row["kind"] == "rank" else body
    return Lease(
        key=key,
        task_id=row["task_id"],
        kind=row["kind"],
        prompt=json.loads(row["prompt"]),
        shown=[texts[position] for position in order],
        shown_order=order,
        issued=row["issued"],
        expires=row["expires"],
        previous=previous,
    )


def shown_view(body: dict[str, Any], order: list[int]) -> dict[str, Any]:
    """A ranking body (by completion position) as one annotator's screen shows it (by slot)."""
    return {
        "tiers": [body["tiers"][position] for position in order],
        "flags": [body["flags"][position] for position in order],
        "note": body["note"],
    }


def skip(db: LabelDB, user: str, key: str, *, now: float | None = None) -> None:
    """Give the task back; it is not offered to this annotator again. Skipping twice is harmless."""
    now = time.time() if now is None else now
    with db.write() as conn:
        conn.execute(
            "UPDATE leases SET closed = ?, outcome = 'skipped' WHERE key = ? AND user = ? AND closed IS NULL",
            (now, key, user),
        )


# -- submitting ------------------------------------------------------------------------------------


def submit_ranking(
    db: LabelDB,
    user: str,
    key: str,
    tiers: Sequence[int | None],
    flags: Sequence[Sequence[str]],
    note: str = "",
    *,
    now: float | None = None,
) -> Submitted:
    """Store one ranking: `tiers` and `flags` per shown slot, in the order the annotator saw them."""
    now = time.time() if now is None else now
    with db.write() as conn:
        stored = stored_submission(conn, user, key)
        if stored is not None:
            return stored
        row = open_lease(conn, user, key, now)
        if row["kind"] != "rank":
            raise LabelError("this lease is for a writing task, not a ranking")
        order = json.loads(row["shown_order"])
        body = ranking_body(tiers, flags, note, order)
        return store_label(conn, row, "ranking", body, app_version=db.app_version, now=now)


def ranking_body(
    tiers: Sequence[int | None], flags: Sequence[Sequence[str]], note: str, order: list[int]
) -> dict[str, Any]:
    """Check a ranking as shown and put it in completion order."""
    k = len(order)
    if len(tiers) != k or len(flags) != k:
        raise LabelError(f"this task has {k} responses; got {len(tiers)} tiers and {len(flags)} flag lists")
    missing = [SLOT_NAMES[slot] for slot, tier in enumerate(tiers) if tier is None]
    if missing:
        raise LabelError(f"place every response in a tier: {', '.join(missing)} not placed yet")
    for slot, tier in enumerate(tiers):
        if isinstance(tier, bool) or not isinstance(tier, int) or not 1 <= tier <= k:
            raise LabelError(f"response {SLOT_NAMES[slot]}: tier must be 1 to {k}, got {tier!r}")
    for slot_flags in flags:
        unknown = [flag for flag in slot_flags if flag not in FLAGS]
        if unknown:
            raise LabelError(f"unknown flag {unknown[0]!r}: use {', '.join(FLAGS)}")
    by_position_tiers: list[int] = [0] * k
    by_position_flags: list[list[str]] = [[] for _ in range(k)]
    for slot, position in enumerate(order):
        by_position_tiers[position] = int(tiers[slot])  # type: ignore[arg-type]
        by_position_flags[position] = [flag for flag in FLAGS if flag in flags[slot]]
    return {"tiers": by_position_tiers, "flags": by_position_flags, "note": note.strip()}


def ranks_from_tiers(tiers: Sequence[int]) -> list[int]:
    """Dense ranks from 0 (best): tiers [1, 1, 3, 4] -> [0, 0, 1, 2]; equal tiers stay equal (a tie)."""
    levels = sorted(set(tiers))
    return [levels.index(tier) for tier in tiers]


def submit_dialogue(
    db: LabelDB,
    user: str,
    key: str,
    messages: list[dict],
    *,
    as_prompt: bool,
    seconds: float | None = None,
    suggested_by: Sequence[str] = (),
    now: float | None = None,
) -> Submitted:
    """Store a demonstration (messages ending with an assistant turn) or a prompt (ending with a user turn).

    `key` is a writing task's lease key, or a key the form was issued for a dialogue written freely.
    """
    now = time.time() if now is None else now
    kind = "prompt" if as_prompt else "demonstration"
    if len(key) < 16:
        raise LabelError("invalid submission key: reload the page")
    with db.write() as conn:
        stored = stored_submission(conn, user, key)  # first: a repeated submit may carry a moved-on form
        if stored is not None:
            return stored
        body = dialogue_body(messages, as_prompt=as_prompt, suggested_by=suggested_by)
        if conn.execute("SELECT 1 FROM leases WHERE key = ?", (key,)).fetchone() is None:
            cursor = conn.execute(
                "INSERT INTO labels (key, kind, task_id, user, body, shown_order, seconds, app_version, created) "
                "VALUES (?, ?, NULL, ?, ?, NULL, ?, ?, ?)",
                (key, kind, user, json.dumps(body, ensure_ascii=False), seconds, db.app_version, now),
            )
            return Submitted(cursor.lastrowid, key, duplicate=False)
        row = open_lease(conn, user, key, now)
        prompt = json.loads(row["prompt"])
        if row["kind"] != "write" or as_prompt:
            raise LabelError("this lease is for a demonstration of a queued prompt")
        if messages[: len(prompt)] != prompt:
            raise LabelError("a demonstration for a queued prompt must start with that prompt, unchanged")
        return store_label(conn, row, kind, body, app_version=db.app_version, now=now)


def dialogue_body(messages: list[dict], *, as_prompt: bool, suggested_by: Sequence[str]) -> dict[str, Any]:
    try:
        if as_prompt:
            return {"prompt": validate_prompt({"prompt": messages})["prompt"]}
        messages = validate_conversation({"messages": messages})["messages"]
    except DataError as err:
        raise LabelError(f"{err.field}: {err.message}") from None
    return {"messages": messages, "suggested_by": sorted(set(suggested_by))}


def stored_submission(conn: sqlite3.Connection, user: str, key: str) -> Submitted | None:
    """The label already stored under `key`: a retried submission is answered with it."""
    row = conn.execute("SELECT id, user FROM labels WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    if row["user"] != user:
        raise LabelError("that submission key belongs to another annotator")
    return Submitted(row["id"], key, duplicate=True)


def open_lease(conn: sqlite3.Connection, user: str, key: str, now: float) -> sqlite3.Row:
    """The caller's lease `key`, checked to be theirs, not skipped, and (if expired) still with room."""
    row = conn.execute(
        "SELECT s.*, t.kind, t.prompt, t.labelled, t.overlap FROM leases AS s "
        "JOIN tasks AS t ON t.id = s.task_id WHERE s.key = ?",
        (key,),
    ).fetchone()
    if row is None or row["user"] != user:
        raise LabelError("no such lease of yours: reload the page to get your next task")
    if row["outcome"] == "skipped":
        raise LabelError("you skipped this task: it cannot be submitted any more")
    if row["expires"] <= now:
        others = conn.execute(
            "SELECT COUNT(*) FROM leases WHERE task_id = ? AND key != ? AND closed IS NULL AND expires > ?",
            (row["task_id"], key, now),
        ).fetchone()[0]
        if row["labelled"] + others >= row["overlap"]:
            raise LabelError(
                "your lease on this task expired and it went to another annotator: take the next one"
            )
    return row


def store_label(
    conn: sqlite3.Connection, lease_row: sqlite3.Row, kind: str, body: dict, *, app_version: str, now: float
) -> Submitted:
    """Append the label, count it on its task and close the lease (inside the caller's transaction)."""
    task_id, user, key = lease_row["task_id"], lease_row["user"], lease_row["key"]
    cursor = conn.execute(
        "INSERT INTO labels (key, kind, task_id, user, body, shown_order, seconds, app_version, created) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key,
            kind,
            task_id,
            user,
            json.dumps(body, ensure_ascii=False),
            lease_row["shown_order"],
            now - lease_row["issued"],
            app_version,
            now,
        ),
    )
    conn.execute("UPDATE tasks SET labelled = labelled + 1 WHERE id = ?", (task_id,))
    conn.execute("UPDATE leases SET closed = ?, outcome = 'submitted' WHERE key = ?", (now, key))
    return Submitted(cursor.lastrowid, key, duplicate=False)


# -- undo and discard ------------------------------------------------------------------------------


def undo(
    db: LabelDB, user: str, key: str, *, lease_seconds: float = LEASE_SECONDS, now: float | None = None
) -> Lease | None:
    """Retract the caller's submission `key`; a ranking or writing task comes back to them to redo.

    Undoing the same submission twice retracts it once and returns the same lease.
    """
    now = time.time() if now is None else now
    with db.write() as conn:
        label = conn.execute("SELECT * FROM labels WHERE key = ? AND user = ?", (key, user)).fetchone()
        if label is None:
            raise LabelError("nothing to undo: that submission is not one of yours")
        retraction = conn.execute(
            "SELECT reason FROM retractions WHERE label_id = ?", (label["id"],)
        ).fetchone()
        if retraction is None:
            retract(conn, label, by_user=user, reason="undo", now=now)
        elif retraction["reason"] != "undo":
            raise LabelError("an admin discarded this label already")
        if label["task_id"] is None:
            return None
        held = conn.execute(
            "SELECT key FROM leases WHERE task_id = ? AND user = ? AND closed IS NULL AND expires > ?",
            (label["task_id"], user, now),
        ).fetchone()
        if held is not None:
            return load_lease(conn, held["key"])
        redone = conn.execute(
            "SELECT 1 FROM live_labels WHERE task_id = ? AND user = ?", (label["task_id"], user)
        ).fetchone()
        if redone is not None:
            return None
        new_key = issue(
            conn, label["task_id"], user, now=now, lease_seconds=lease_seconds, replaces=label["id"]
        )
        return None if new_key is None else load_lease(conn, new_key)


def discard(db: LabelDB, admin: str, label_id: int, reason: str, *, now: float | None = None) -> None:
    """An admin retracts anyone's label, giving a reason; the task's place reopens for others."""
    now = time.time() if now is None else now
    if not reason.strip():
        raise LabelError("give a reason for discarding the label")
    with db.write() as conn:
        role = conn.execute("SELECT role FROM users WHERE name = ?", (admin,)).fetchone()
        if role is None or role["role"] != "admin":
            raise LabelError("only admins can discard labels")
        label = conn.execute("SELECT * FROM labels WHERE id = ?", (label_id,)).fetchone()
        if label is None:
            raise LabelError(f"no label {label_id}")
        if conn.execute("SELECT 1 FROM retractions WHERE label_id = ?", (label_id,)).fetchone():
            raise LabelError(f"label {label_id} is retracted already")
        retract(conn, label, by_user=admin, reason=f"discarded: {reason.strip()}", now=now)


def retract(conn: sqlite3.Connection, label: sqlite3.Row, *, by_user: str, reason: str, now: float) -> None:
    conn.execute("INSERT INTO retractions VALUES (?, ?, ?, ?)", (label["id"], by_user, reason, now))
    if label["task_id"] is not None:
        conn.execute("UPDATE tasks SET labelled = labelled - 1 WHERE id = ?", (label["task_id"],))
