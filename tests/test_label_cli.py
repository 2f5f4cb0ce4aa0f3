"""`rlhf label ...` and `rlhf app` on the command line: users, import, status, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import DEMO_DATA, REPO

from pipeline.app.db import open_db
from pipeline.app.users import verify_login
from pipeline.cli import main


def test_users_are_added_with_a_password_from_stdin(tmp_path, capsys):
    store = tmp_path / "store"
    command = [sys.executable, "-m", "pipeline.cli", "label", "users", "add", "ann", "--role", "admin"]
    added = subprocess.run(
        [*command, "--password-stdin", "--store", str(store)],
        input="a long password\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    db = open_db(store / "labels.db")
    assert verify_login(db, "ann", "a long password") and not verify_login(db, "ann", "a long password\n")
    # Without --password-stdin it asks on the terminal; under pytest there is none.
    assert main(["label", "users", "add", "ben", "--store", str(store)]) == 2
    assert "--password-stdin" in capsys.readouterr().err


def test_import_queues_prompts_and_comparisons_and_status_counts_them(tmp_path, capsys):
    at = ["--store", str(tmp_path / "store")]
    prompts = len((DEMO_DATA / "prompts.jsonl").read_text().splitlines())
    groups = len((DEMO_DATA / "comparisons.jsonl").read_text().splitlines())
    assert main(["label", "import", str(DEMO_DATA / "prompts.jsonl"), *at]) == 0
    assert main(["label", "import", str(DEMO_DATA / "comparisons.jsonl"), "--overlap", "2", *at]) == 0
    rankless = tmp_path / "groups.jsonl"
    rankless.write_text('{"prompt": "Hi?", "completions": ["Hello!", "Hey."]}\n')
    assert main(["label", "import", str(rankless), *at]) == 0
    out = capsys.readouterr().out
    assert f"queued {prompts} writing tasks" in out and f"queued {groups} ranking tasks" in out
    assert main(["label", "status", *at]) == 0
    status = capsys.readouterr().out
    assert f"rank   {groups + 1} tasks: {groups + 1} waiting" in status
    assert f"0 of {2 * groups + 1} labels" in status and f"write  {prompts} tasks" in status


def test_user_errors_are_one_line(tmp_path, capsys):
    at = ["--store", str(tmp_path / "store")]
    cases = [
        (["label", "import", str(DEMO_DATA / "sft.jsonl"), *at], "holds conversations"),
        (["label", "export", *at], "nothing to export"),
        (["label", "status", "--store", "s3://bucket/prefix"], "--db PATH"),
        (["app", *at], "no users"),
        (
            [
                "label",
                "import",
                str(REPO / "tests" / "broken" / "k_below_2.jsonl"),
                "--kind",
                "comparison",
                *at,
            ],
            "K=1",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not any(Path(tmp_path / "store").glob("labels-*"))


def test_artifacts_rm_keeps_what_the_label_database_refers_to(tmp_path, store, capsys):
    from pipeline.app.tasks import Completion, NewTask, add_tasks

    payload = tmp_path / "weights"
    payload.mkdir()
    (payload / "model.bin").write_bytes(b"0")
    kept, free = store.publish("sft", payload, config={}), store.publish("sft", payload, config={})
    db = open_db(Path(store.root) / "labels.db")
    prompt = [{"role": "user", "content": "Hi?"}]
    add_tasks(db, [NewTask("rank", prompt, "t", [Completion(text, "sft", kept.id) for text in ("a", "b")])])
    assert main(["artifacts", "rm", kept.id, "--store", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert "label database" in err and "generated 2 completions in 1 ranking tasks" in err
    assert main(["artifacts", "rm", free.id, "--store", str(store.root)]) == 0
    assert [a.id for a in store.list()] == [kept.id]
