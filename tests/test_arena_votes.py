"""Arena votes and chat feedback in the label database; a vote exported as a K = 2 comparison the reward stage reads."""

from __future__ import annotations

import json
import sqlite3

import pytest

from pipeline.app import tasks
from pipeline.app.db import SCHEMA_VERSION, LabelError, artifact_references, open_db
from pipeline.app.export import export_labels
from pipeline.app.users import add_user
from pipeline.app.votes import Reply, arena_votes, record_arena_vote, record_chat_feedback
from pipeline.data_sources import data_file
from pipeline.datasets import load_records

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 32, "seed": 11}


def reply(text: str, artifact_id: str | None) -> Reply:
    return Reply(text, model=f"{artifact_id or 'some/folder'}", artifact_id=artifact_id, sampling=SAMPLING)


@pytest.fixture()
def db(tmp_path):
    db = open_db(tmp_path / "labels.db", app_version="test")
    for name in ("ann", "ben"):
        add_user(db, name, "annotator", f"{name}-password")
    return db


def vote_each_way(db) -> dict[str, int]:
    """One vote per verdict, sft-a always on the left except in the "right" vote, where ppo-b is."""
    ids = {}
    for i, verdict in enumerate(("left", "right", "tie", "both_bad")):
        left, right = reply(f"Apple {i}.", "sft-a"), reply(f"Pear {i}.", "ppo-b")
        if verdict == "right":
            left, right = reply(f"Plum {i}.", "ppo-b"), reply(f"Fig {i}.", "sft-a")
        saved = record_arena_vote(db, "ann", f"round-key-{i:08d}", PROMPT, left, right, verdict, seconds=4.25)
        ids[verdict] = saved.label_id
    return ids


def test_each_verdict_exports_as_a_k2_comparison_with_both_models_as_provenance(db, store):
    ids = vote_each_way(db)
    artifact = export_labels(db, store)
    records = {
        r["verdict"]: r
        for r in load_records(store.local_path(artifact) / "comparisons.jsonl", "comparison").records
    }
    assert sorted(records) == ["both_bad", "left", "right", "tie"]
    assert records["left"]["ranks"] == [0, 1] and records["left"]["completions"] == ["Apple 0.", "Pear 0."]
    assert records["right"]["ranks"] == [1, 0] and records["right"]["completions"] == ["Plum 1.", "Fig 1."]
    assert records["tie"]["ranks"] == [0, 0] and not records["tie"]["both_bad"]
    assert records["both_bad"]["ranks"] == [0, 0] and records["both_bad"]["both_bad"]
    left = records["left"]
    assert left["id"] == f"arena-{ids['left']}" and left["prompt"] == PROMPT and left["task"] is None
    assert left["provenance"] == [
        {"model": "sft-a", "artifact_id": "sft-a", "sampling": SAMPLING},
        {"model": "ppo-b", "artifact_id": "ppo-b", "sampling": SAMPLING},
    ]
    assert [p["artifact_id"] for p in records["right"]["provenance"]] == ["ppo-b", "sft-a"]  # sides as seen
    assert left["annotator"].startswith("a-") and left["seconds"] == 4.2 and left["arena_mode"] == "anonymous"
    metrics = artifact.metrics
    # Only the decisive votes give a training pair; ties and "both bad" are kept but pair nothing.
    assert (metrics["comparisons"], metrics["arena_votes"], metrics["preference_pairs"]) == (4, 4, 2)
    assert metrics["agreement_items"] == 0  # votes are not tasks several annotators share
    inputs = artifact.manifest["inputs"]
    assert {"artifact": "sft-a", "role": "completions"} in inputs
    assert {"artifact": "ppo-b", "role": "completions"} in inputs


def test_the_parquet_copy_keeps_the_vote_fields_after_a_ranking(db, store):
    import datasets

    tasks.add_tasks(
        db, [tasks.NewTask("rank", PROMPT, "t", [tasks.Completion("A."), tasks.Completion("B.")])]
    )
    lease = tasks.lease(db, "ben", "rank")
    tasks.submit_ranking(db, "ben", lease.key, [1, 2], [[], []], "")  # a ranking first: its columns lead
    vote_each_way(db)
    folder = store.local_path(export_labels(db, store)) / "parquet"
    comparisons = datasets.load_dataset(str(folder), "comparisons", split="train")
    assert comparisons["verdict"] == [None, "left", "right", "tie", "both_bad"]
    assert comparisons["both_bad"] == [None, False, False, False, True]


def test_the_reward_stage_reads_arena_votes_from_the_export_with_no_extra_step(db, store, tiny_tokenizer):
    from stages.reward.groups import collate
    from stages.reward.losses import ranked_pairs
    from stages.reward.train import Config, load_groups

    vote_each_way(db)
    export_labels(db, store)
    path = data_file("labels:latest", "comparison", store)
    cfg = Config(model="unused", data=path, eval_data=path, max_length=64, report_to="none")
    train, held_out, counts = load_groups(cfg, tiny_tokenizer)
    assert counts.skipped_no_pairs == 4  # tie and both_bad, in train and held-out: no pair to learn from
    assert [group.ranks for group in train] == [[0, 1], [1, 0]]
    batch = collate(train, tiny_tokenizer.pad_token_id)
    pairs = ranked_pairs(batch["ranks"], batch["groups"])
    # Rows: Apple 0 (0), Pear 0 (1), Plum 1 (2), Fig 1 (3): the winners are Apple over Pear, Fig over Plum.
    assert pairs.better.tolist() == [0, 3] and pairs.worse.tolist() == [1, 2]
    decoded = tiny_tokenizer.decode(batch["input_ids"][3], skip_special_tokens=True)
    assert "Fig 1." in decoded


def test_a_vote_is_stored_once_and_only_when_it_would_export(db):
    first = record_arena_vote(db, "ann", "k" * 20, PROMPT, reply("A", "m1"), reply("B", "m2"), "tie")
    again = record_arena_vote(db, "ann", "k" * 20, PROMPT, reply("A", "m1"), reply("B", "m2"), "left")
    assert again.duplicate and again.label_id == first.label_id
    assert [vote.verdict for vote in arena_votes(db)] == ["tie"]  # the second click changed nothing
    with pytest.raises(LabelError, match="another annotator"):
        record_arena_vote(db, "ben", "k" * 20, PROMPT, reply("A", "m1"), reply("B", "m2"), "left")
    with pytest.raises(LabelError, match="the right reply: empty completion"):
        record_arena_vote(db, "ann", "e" * 20, PROMPT, reply("A", "m1"), reply("  ", "m2"), "left")
    with pytest.raises(LabelError, match="unknown verdict"):
        record_arena_vote(db, "ann", "v" * 20, PROMPT, reply("A", "m1"), reply("B", "m2"), "A")
    with pytest.raises(LabelError, match="must end with a user turn"):
        record_arena_vote(db, "ann", "p" * 20, PROMPT[:1] + [{"role": "user", "content": "x"},
                          {"role": "assistant", "content": "y"}], reply("A", "m1"), reply("B", "m2"), "left")  # fmt: skip
    assert len(arena_votes(db)) == 1


def test_votes_and_feedback_keep_their_models_from_artifacts_rm(db):
    vote_each_way(db)
    record_arena_vote(db, "ben", "f" * 20, PROMPT, reply("A", "sft-a"), reply("B", None), "left")
    rated = record_chat_feedback(db, "ann", "c" * 20, PROMPT, reply("Kiwi.", "ppo-c"), "up")
    changed = record_chat_feedback(
        db, "ann", "d" * 20, PROMPT, reply("Kiwi.", "ppo-c"), "down", replaces=rated.label_id
    )
    assert not changed.duplicate
    assert artifact_references(db.path) == {
        "ppo-b": ["compared in 4 arena votes"],
        "ppo-c": ["rated in 2 chat feedback labels"],
        "sft-a": ["compared in 5 arena votes"],
    }
    live = (
        sqlite3.connect(db.path)
        .execute("SELECT body FROM live_labels WHERE kind = 'chat_feedback'")
        .fetchall()
    )
    assert [json.loads(body)["rating"] for (body,) in live] == ["down"]  # the change retracted the "up"
    with pytest.raises(LabelError, match="unknown rating"):
        record_chat_feedback(db, "ann", "g" * 20, PROMPT, reply("Kiwi.", "ppo-c"), "meh")


def test_chat_feedback_exports_once_per_reply_in_trls_unpaired_format(db, store, tiny_tokenizer):
    import datasets
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    first = record_chat_feedback(db, "ann", "c" * 20, PROMPT, reply("Kiwi.", "ppo-c"), "up")
    record_chat_feedback(
        db, "ann", "d" * 20, PROMPT, reply("Kiwi.", "ppo-c"), "down", replaces=first.label_id
    )
    ben = record_chat_feedback(db, "ben", "e" * 20, PROMPT, reply("Mango.", None), "up")
    artifact = export_labels(db, store)
    rows = [
        json.loads(line) for line in (store.local_path(artifact) / "feedback.jsonl").read_text().splitlines()
    ]
    # The changed rating is exported once, as its last value; the retracted "up" is left out.
    assert [(row["completion"][0]["content"], row["label"]) for row in rows] == [
        ("Kiwi.", False),
        ("Mango.", True),
    ]
    assert rows[1]["id"] == f"feedback-{ben.label_id}" and rows[1]["prompt"] == PROMPT
    assert rows[0]["completion"] == [{"role": "assistant", "content": "Kiwi."}]
    assert (rows[0]["artifact_id"], rows[0]["sampling"]) == ("ppo-c", SAMPLING)
    assert rows[0]["annotator"] != rows[1]["annotator"] and rows[0]["annotator"].startswith("a-")
    assert artifact.metrics["chat_feedback"] == 2 and artifact.metrics["comparisons"] == 0
    assert {"artifact": "ppo-c", "role": "completions"} in artifact.manifest["inputs"]
    parquet = datasets.load_dataset(str(store.local_path(artifact) / "parquet"), "feedback", split="train")
    assert parquet["label"] == [False, True]
    # TRL reads the rows as they are: conversational, templated into prompt and completion text.
    assert is_conversational(rows[0])
    templated = maybe_apply_chat_template(
        {key: rows[0][key] for key in ("prompt", "completion", "label")}, tiny_tokenizer
    )
    assert templated["label"] is False and "Kiwi." in templated["completion"]
    assert "Name a fruit." in templated["prompt"] and "Kiwi." not in templated["prompt"]


def test_a_schema_1_database_opens_and_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    db = open_db(path)
    add_user(db, "ann", "annotator", "ann-password")
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX labels_kind")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    db = open_db(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'labels_kind'").fetchone() == (1,)
    record_arena_vote(db, "ann", "m" * 20, PROMPT, reply("A", "x"), reply("B", "y"), "right")
    assert len(arena_votes(db)) == 1
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(LabelError, match="newer version"):
        open_db(path)
