"""The label database: one SQLite file with the users, the task queue, leases and the append-only labels.

How it holds up under many annotators and a killed server:

- WAL journal: readers never wait for the writer, and a reader sees one consistent snapshot.
- Every change is one `BEGIN IMMEDIATE` transaction. It takes the write lock when it starts, so what a
  transaction checks (a task's free places, who holds a lease) cannot change under it before it
  commits; a writer that finds the lock taken sleeps and retries for up to `BUSY_TIMEOUT_S` seconds.
  Inside one process writers also queue on a lock of their own, which wakes them at once instead of
  after SQLite's polling sleeps.
- `synchronous=FULL`: a commit has reached the disk when it returns, so a label the app acknowledged
  survives the process being killed (and a power cut), and a killed transaction leaves nothing behind.
- `labels` and `retractions` refuse UPDATE and DELETE (triggers): undo and an admin's discard append a
  retraction row; nothing submitted is ever changed or lost.

SQLite's locks need a local disk: on a network filesystem they are unreliable, and object storage has
none. So the database lies beside a local store (its root folder; the store ignores plain files) and
must be named with `--db PATH` when the store is an S3 URL.

Arena votes and chat feedback (issue 12) are further label kinds in `labels` (pipeline.app.votes), and
the models they name are in `artifact_references`. Schema 2 added them with the `labels_kind` index; a
schema-1 database is brought up to 2 when it is opened (the index comes from SCHEMA's IF NOT EXISTS), and
an older app refuses a schema-2 database rather than ignore votes it does not know.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError

DB_NAME = "labels.db"
BUSY_TIMEOUT_S = 60.0
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('annotator', 'admin')),
    password_hash TEXT NOT NULL,           -- scrypt$n$r$p$salt$hash (pipeline.app.users)
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('rank', 'write')),
    prompt TEXT NOT NULL,                  -- JSON messages ending with a user turn
    overlap INTEGER NOT NULL CHECK (overlap >= 1),   -- labels wanted, each from a different annotator
    labelled INTEGER NOT NULL DEFAULT 0,   -- live (not retracted) labels, kept with every label and retraction
    source TEXT NOT NULL,                  -- file:line of an import, or the generate run
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks (kind, id) WHERE labelled < overlap;
CREATE TABLE IF NOT EXISTS completions (
    task_id INTEGER NOT NULL REFERENCES tasks (id),
    position INTEGER NOT NULL,             -- canonical order; what annotators see is shuffled per lease
    text TEXT NOT NULL,
    model TEXT,                            -- the model source that wrote it (NULL: imported without one)
    artifact_id TEXT,                      -- the artifact it resolved to, for lineage and `artifacts rm`
    sampling TEXT,                         -- JSON: temperature, top_p, max_new_tokens, seed, engine
    PRIMARY KEY (task_id, position)
);
CREATE INDEX IF NOT EXISTS completions_artifact ON completions (artifact_id) WHERE artifact_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY,                  -- the idempotency key of the one submission it allows
    task_id INTEGER NOT NULL REFERENCES tasks (id),
    user TEXT NOT NULL REFERENCES users (name),
    shown_order TEXT NOT NULL,             -- JSON: shown slot -> completion position
    issued REAL NOT NULL,
    expires REAL NOT NULL,
    closed REAL,                           -- when it was submitted or skipped
    outcome TEXT CHECK (outcome IN ('submitted', 'skipped')),
    replaces INTEGER REFERENCES labels (id)   -- the label its holder undid to do the task again
);
CREATE INDEX IF NOT EXISTS leases_open ON leases (task_id) WHERE closed IS NULL;
CREATE INDEX IF NOT EXISTS leases_user ON leases (user, task_id);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,              -- a retried or double-clicked submission finds its row here
    kind TEXT NOT NULL,                    -- ranking, demonstration, prompt, arena_vote, chat_feedback
    task_id INTEGER REFERENCES tasks (id), -- NULL for a dialogue or prompt written freely
    user TEXT NOT NULL REFERENCES users (name),
    body TEXT NOT NULL,                    -- JSON; see pipeline.app.tasks for each kind
    shown_order TEXT,
    seconds REAL,                          -- time from the task shown (or the form opened) to submit
    app_version TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_task ON labels (task_id, user);
CREATE INDEX IF NOT EXISTS labels_user ON labels (user, kind, id);
CREATE INDEX IF NOT EXISTS labels_kind ON labels (kind, id);   -- schema 2: the arena's votes by kind
CREATE TABLE IF NOT EXISTS retractions (
    label_id INTEGER PRIMARY KEY REFERENCES labels (id),
    by_user TEXT NOT NULL,
    reason TEXT NOT NULL,                  -- 'undo', or an admin's reason for discarding it
    created REAL NOT NULL
);
CREATE VIEW IF NOT EXISTS live_labels AS
    SELECT * FROM labels WHERE id NOT IN (SELECT label_id FROM retractions);
CREATE TRIGGER IF NOT EXISTS labels_no_update BEFORE UPDATE ON labels
    BEGIN SELECT RAISE(ABORT, 'labels are append-only: retract a label instead'); END;
CREATE TRIGGER IF NOT EXISTS labels_no_delete BEFORE DELETE ON labels
    BEGIN SELECT RAISE(ABORT, 'labels are append-only: retract a label instead'); END;
CREATE TRIGGER IF NOT EXISTS retractions_no_update BEFORE UPDATE ON retractions
    BEGIN SELECT RAISE(ABORT, 'retractions are append-only'); END;
CREATE TRIGGER IF NOT EXISTS retractions_no_delete BEFORE DELETE ON retractions
    BEGIN SELECT RAISE(ABORT, 'retractions are append-only'); END;
"""


class LabelError(UserError, ValueError):
    """A labelling request that cannot be done as asked; the message says why and what to do."""


class ThreadConnections(threading.local):
    """Each thread's own open connection to the database, made on its first use."""

    connection: sqlite3.Connection | None = None


@dataclass(frozen=True)
class LabelDB:
    """Where the database lies, and the version of the app writing to it (kept on every label).

    Each thread keeps its connection open between transactions: closing the last connection to a WAL
    database checkpoints it and removes the WAL file, which made every transaction cost ~10 ms more.
    """

    path: Path
    app_version: str = "unknown"
    write_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)
    connections: ThreadConnections = field(default_factory=ThreadConnections, compare=False, repr=False)

    def connect(self) -> sqlite3.Connection:
        """A new connection (the caller closes it); transactions use `write` and `read`."""
        # isolation_level=None: no implicit transactions; every transaction below is explicit.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextmanager
    def transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        if self.connections.connection is None:
            self.connections.connection = self.connect()
        conn = self.connections.connection
        conn.execute(begin)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the database's write lock from its first statement."""
        with self.write_lock, self.transaction("BEGIN IMMEDIATE") as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query in it sees the same snapshot."""
        with self.transaction("BEGIN") as conn:
            yield conn


def open_db(path: str | Path, app_version: str = "unknown") -> LabelDB:
    """The database at `path`, created with its schema the first time."""
    path = Path(path)
    if path.is_dir():
        raise LabelError(f"{path} is a folder: --db names the database file, e.g. {path / DB_NAME}")
    path.parent.mkdir(parents=True, exist_ok=True)
    db = LabelDB(path, app_version)
    conn = db.connect()
    try:
        conn.execute("PRAGMA journal_mode = WAL")  # stays set in the file
    finally:
        conn.close()
    with db.write_lock:
        conn = db.connect()
        try:
            # executescript commits any open transaction first, so the script carries its own.
            conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")
        finally:
            conn.close()
    with db.write() as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is not None and int(version["value"]) > SCHEMA_VERSION:
            raise LabelError(f"{path} was written by a newer version of the app (schema {version['value']})")
        conn.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?), ('pseudonym_salt', ?)",
            (str(SCHEMA_VERSION), secrets.token_hex(16)),
        )
        # Schema 1 -> 2 needs no change to existing rows: new label kinds and an index SCHEMA created above.
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    return db


def default_db_path(store_root: str) -> Path:
    """The database beside a local store: `<root>/labels.db`; an object-store root needs `--db PATH`."""
    root = str(store_root)
    if "://" in root and not root.startswith("file://"):
        raise LabelError(
            f"the store {root} is not a local folder, and SQLite must not live on object storage or a "
            "network filesystem: pass --db PATH with a path on a local disk (compose mounts a volume for it)"
        )
    return Path(root.removeprefix("file://")) / DB_NAME


def artifact_references(db_path: Path) -> dict[str, list[str]]:
    """Every artifact the database refers to, with what it did: `rlhf artifacts rm` keeps these."""
    if not Path(db_path).is_file():
        return {}
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        rows = conn.execute(
            "SELECT artifact_id, COUNT(*), COUNT(DISTINCT task_id) FROM completions "
            "WHERE artifact_id IS NOT NULL GROUP BY artifact_id ORDER BY artifact_id"
        ).fetchall()
        suggested = conn.execute(
            "SELECT source.value, COUNT(DISTINCT labels.id) FROM labels, json_each(labels.body, '$.suggested_by') "
            "AS source WHERE labels.kind = 'demonstration' GROUP BY source.value ORDER BY source.value"
        ).fetchall()
        # Retracted votes and ratings count too: a discarded label is kept, and so is what it names.
        compared = conn.execute(
            "SELECT json_extract(labels.body, '$.' || side.value || '.artifact_id') AS artifact, "
            'COUNT(DISTINCT labels.id) FROM labels, json_each(\'["left", "right"]\') AS side '
            "WHERE labels.kind = 'arena_vote' AND artifact IS NOT NULL GROUP BY artifact ORDER BY artifact"
        ).fetchall()
        rated = conn.execute(
            "SELECT json_extract(body, '$.reply.artifact_id') AS artifact, COUNT(*) FROM labels "
            "WHERE kind = 'chat_feedback' AND artifact IS NOT NULL GROUP BY artifact ORDER BY artifact"
        ).fetchall()
    finally:
        conn.close()
    references: dict[str, list[str]] = {}
    for artifact_id, completions, tasks in rows:
        references.setdefault(artifact_id, []).append(
            f"generated {completions} completions in {tasks} ranking tasks"
        )
    for artifact_id, demonstrations in suggested:
        references.setdefault(artifact_id, []).append(f"suggested drafts of {demonstrations} demonstrations")
    for artifact_id, votes in compared:
        references.setdefault(artifact_id, []).append(f"compared in {votes} arena votes")
    for artifact_id, ratings in rated:
        references.setdefault(artifact_id, []).append(f"rated in {ratings} chat feedback labels")
    return references
