"""Twenty annotators at once, ten threads and ten processes on one database file, and a killed writer.

Each annotator takes tasks until none is left, submits each, sometimes submits the same key again (a
retry or a double click), and sometimes undoes a submission (twice, as a double click would) and redoes
the task. Whatever the interleaving, the end state is fixed: every task holds exactly `overlap` live
labels from different annotators, every submitted key is stored once, no lease went to two annotators,
and every undo left exactly one retraction.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.app import tasks
from pipeline.app.db import LabelDB, open_db
from pipeline.app.tasks import Completion, NewTask
from pipeline.app.users import add_user

TASKS, OVERLAP, THREADS, PROCESSES = 30, 3, 10, 10
PROMPT = [{"role": "user", "content": "Say something."}]


def annotate(db_path: str, user: str, seed: int, start_at: float) -> dict:
    """One annotator's session; returns what it was given and what the database answered."""
    db = LabelDB(Path(db_path), app_version="test")
    rng = random.Random(seed)
    log: dict = {"user": user, "leases": [], "stored": {}, "undone": []}
    time.sleep(max(0.0, start_at - time.time()))
    undone_tasks: set[int] = set()
    while (lease := tasks.lease(db, user, "rank")) is not None:
        log["leases"].append([lease.key, lease.task_id])
        tiers = [rng.randint(1, len(lease.shown)) for _ in lease.shown]
        saved = tasks.submit_ranking(db, user, lease.key, tiers, [[] for _ in tiers])
        assert not saved.duplicate
        if rng.random() < 0.3:
            again = tasks.submit_ranking(db, user, lease.key, tiers, [[] for _ in tiers])
            assert again.duplicate and again.label_id == saved.label_id
        log["stored"][lease.key] = saved.label_id
        if rng.random() < 0.15 and lease.task_id not in undone_tasks:
            undone_tasks.add(lease.task_id)
            redo = tasks.undo(db, user, lease.key)
            assert redo is not None and redo.task_id == lease.task_id
            assert tasks.undo(db, user, lease.key).key == redo.key  # the double click
            log["undone"].append(lease.key)
    return log


def annotate_to_file(db_path: str, user: str, seed: int, start_at: float, out: str) -> None:
    Path(out).write_text(json.dumps(annotate(db_path, user, seed, start_at)))


def test_twenty_annotators_in_threads_and_processes(tmp_path):
    db = open_db(tmp_path / "labels.db", app_version="test")
    users = [f"u{i:02d}" for i in range(THREADS + PROCESSES)]
    for user in users:
        add_user(db, user, "annotator", "password-" + user)
    new = [
        NewTask("rank", PROMPT, f"t{i}", [Completion(f"{i}:{j}") for j in range(2 + i % 4)])
        for i in range(TASKS)
    ]
    tasks.add_tasks(db, new, overlap=OVERLAP)

    start_at = time.time() + 3.0  # the processes need a moment to start; then everyone begins together
    spawn = multiprocessing.get_context("spawn")
    processes = [
        spawn.Process(
            target=annotate_to_file, args=(str(db.path), user, i, start_at, str(tmp_path / f"{user}.json"))
        )
        for i, user in enumerate(users[THREADS:], THREADS)
    ]
    for process in processes:
        process.start()
    logs: list[dict] = []
    threads = [
        threading.Thread(target=lambda u=user, i=i: logs.append(annotate(str(db.path), u, i, start_at)))
        for i, user in enumerate(users[:THREADS])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    logs += [json.loads((tmp_path / f"{user}.json").read_text()) for user in users[THREADS:]]
    assert len(logs) == len(users)

    conn = sqlite3.connect(db.path)
    # No lease given twice: every key went to one annotator, once.
    keys = [key for log in logs for key, _ in log["leases"]]
    assert len(keys) == len(set(keys))
    # Every submitted key is stored exactly once, under the id its submitter was told.
    stored = {key: label for log in logs for key, label in log["stored"].items()}
    rows = dict(conn.execute("SELECT key, id FROM labels").fetchall())
    assert rows == stored
    # Every undo left one retraction, and only those.
    undone = sorted(key for log in logs for key in log["undone"])
    retracted = conn.execute(
        "SELECT l.key, r.reason, r.by_user = l.user FROM retractions AS r JOIN labels AS l ON l.id = r.label_id"
    ).fetchall()
    assert sorted(key for key, _, _ in retracted) == undone
    assert all(reason == "undo" and own for _, reason, own in retracted)
    # No task over its overlap, none under it (everyone worked until the queue was empty), none twice by one.
    live = conn.execute("SELECT task_id, user FROM live_labels").fetchall()
    per_task: dict[int, list[str]] = {}
    for task_id, user in live:
        per_task.setdefault(task_id, []).append(user)
    assert sorted(per_task) == list(range(1, TASKS + 1))
    assert all(len(who) == OVERLAP == len(set(who)) for who in per_task.values())
    counted = dict(conn.execute("SELECT id, labelled FROM tasks").fetchall())
    assert counted == {task_id: OVERLAP for task_id in per_task}
    assert conn.execute("SELECT COUNT(*) FROM leases WHERE closed IS NULL").fetchone()[0] == 0


WRITER = """
import sys, time
from pathlib import Path
from pipeline.app import tasks
from pipeline.app.db import LabelDB
from pipeline.app.tasks import Completion, NewTask
db = LabelDB(Path(sys.argv[1]), app_version="test")
prompt = [{"role": "user", "content": "Say something."}]
for i in range(100000):
    tasks.add_tasks(db, [NewTask("rank", prompt, f"w{i}", [Completion(f"{i}:{j}") for j in range(4)])])
    lease = tasks.lease(db, "ann", "rank")
    saved = tasks.submit_ranking(db, "ann", lease.key, [1, 2, 2, 3], [[]] * 4)
    print(lease.key, flush=True)  # acknowledged: the commit has returned
"""


def test_a_killed_writer_loses_no_acknowledged_label_and_leaves_no_half_task(tmp_path):
    db = open_db(tmp_path / "labels.db", app_version="test")
    add_user(db, "ann", "annotator", "ann-password")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db.path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    acknowledged = []
    deadline = time.time() + 60
    while len(acknowledged) < 25 and time.time() < deadline:
        acknowledged.append(writer.stdout.readline().strip())
    writer.send_signal(signal.SIGKILL)  # mid-way through some transaction
    rest = writer.communicate()[0].split()
    acknowledged += rest
    assert len(acknowledged) >= 25
    conn = sqlite3.connect(db.path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {key for (key,) in conn.execute("SELECT key FROM labels")}
    assert set(acknowledged) <= stored
    # Every task has all four completions (a task is added in one transaction) and its count is right.
    assert conn.execute(
        "SELECT COUNT(*) FROM tasks AS t WHERE (SELECT COUNT(*) FROM completions WHERE task_id = t.id) != 4"
    ).fetchone() == (0,)
    assert conn.execute(
        "SELECT COUNT(*) FROM tasks AS t WHERE labelled != (SELECT COUNT(*) FROM live_labels WHERE task_id = t.id)"
    ).fetchone() == (0,)
    assert conn.execute(
        "SELECT COUNT(*) FROM labels AS l JOIN leases AS s ON s.key = l.key WHERE s.outcome IS NOT 'submitted'"
    ).fetchone() == (0,)
