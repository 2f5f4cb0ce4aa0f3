"""`rlhf label export`: the labels artifact's records, Parquet copy, agreement and lineage; data references."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.app import tasks
from pipeline.app.db import LabelError, open_db
from pipeline.app.export import export_labels
from pipeline.app.tasks import Completion, NewTask
from pipeline.app.users import add_user
from pipeline.data_sources import data_file, data_input
from pipeline.datasets import load_records
from pipeline.store import StoreError

PROMPT_1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
PROMPT_2 = [{"role": "user", "content": "Say <script>alert(1)</script>"}]
SAMPLING = {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 16, "seed": 3}


def rank(db, user, wanted_tiers, note=""):
    """Lease the user's next task and rank it so that the tiers by completion position are `wanted_tiers`."""
    lease = tasks.lease(db, user, "rank")
    shown = [wanted_tiers[position] for position in lease.shown_order]
    return lease, tasks.submit_ranking(db, user, lease.key, shown, [[] for _ in shown], note)


@pytest.fixture()
def labelled(tmp_path):
    db = open_db(tmp_path / "labels.db", app_version="test")
    for name in ("ann", "ben"):
        add_user(db, name, "annotator", f"{name}-password")
    tasks.add_tasks(
        db,
        [
            NewTask(
                "rank",
                PROMPT_1,
                "t1",
                [
                    Completion("Red.", "sft:latest", "sft-a", SAMPLING),
                    Completion("Blue", "sft:latest", "sft-a", SAMPLING),
                    Completion("I like colours.", "some/folder", None, None),
                ],
            ),
            NewTask(
                "rank",
                PROMPT_2,
                "t2",
                [
                    Completion("<script>alert(1)</script>", "ppo:latest", "ppo-b", SAMPLING),
                    Completion("I won't run scripts.", "sft:latest", "sft-a", SAMPLING),
                ],
            ),
        ],
        overlap=2,
    )
    rank(db, "ann", [1, 1, 2], "red and blue are both fine")  # task 1: ranks [0, 0, 1]
    first, _ = rank(db, "ann", [1, 2])  # task 2, then undone and redone below
    again = tasks.undo(db, "ann", first.key)
    tasks.submit_ranking(
        db, "ann", again.key, [[2, 1][p] for p in again.shown_order], [[], []]
    )  # ranks [1, 0]
    rank(db, "ben", [1, 2, 3])  # task 1: ranks [0, 1, 2]
    rank(db, "ben", [1, 2])  # task 2: ranks [0, 1]
    dialogue = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    tasks.submit_dialogue(db, "ann", "d" * 22, dialogue, as_prompt=False, suggested_by=["sft-a"])
    tasks.submit_dialogue(
        db, "ben", "p" * 22, [{"role": "user", "content": "Why is the sky blue?"}], as_prompt=True
    )
    return db


def test_export_writes_canonical_records_with_provenance_and_agreement(labelled, store):
    artifact = export_labels(labelled, store)
    folder = store.local_path(artifact)
    comparisons = load_records(folder / "comparisons.jsonl", "comparison").records
    assert len(comparisons) == 4
    by_task = {}
    for record in comparisons:
        by_task.setdefault(record["task"], {})[record["annotator"]] = record
    assert sorted(by_task) == [1, 2] and all(len(records) == 2 for records in by_task.values())
    ann_1 = next(r for r in by_task[1].values() if r["note"])
    assert ann_1["prompt"] == PROMPT_1 and ann_1["completions"] == ["Red.", "Blue", "I like colours."]
    assert ann_1["ranks"] == [0, 0, 1]  # the tie is kept
    assert ann_1["provenance"][0] == {"model": "sft:latest", "artifact_id": "sft-a", "sampling": SAMPLING}
    assert ann_1["provenance"][2] == {"model": "some/folder", "artifact_id": None, "sampling": None}
    assert sorted(r["ranks"] for r in by_task[2].values()) == [[0, 1], [1, 0]]
    annotators = {r["annotator"] for r in comparisons}
    assert len(annotators) == 2 and all(a.startswith("a-") and len(a) == 12 for a in annotators)
    assert '"ann"' not in json.dumps(comparisons) and '"ben"' not in json.dumps(comparisons)

    (conversation,) = load_records(folder / "conversations.jsonl", "conversation").records
    assert conversation["messages"][1]["content"] == "Hello! How can I help?" and conversation[
        "suggested_by"
    ] == ["sft-a"]
    (prompt,) = load_records(folder / "prompts.jsonl", "prompt").records
    assert prompt["prompt"] == [{"role": "user", "content": "Why is the sky blue?"}]

    metrics = artifact.metrics
    assert (metrics["comparisons"], metrics["conversations"], metrics["prompts"]) == (4, 1, 1)
    assert metrics["retracted_labels_left_out"] == 1
    # Ranked pairs: [0,0,1] has 2, [0,1,2] has 3, each K=2 ranking has 1: 7 in all.
    assert metrics["preference_pairs"] == 7
    # Task 1: agreement 2/3, tau 2/sqrt(6); task 2: 0/1, tau -1 (see test_label_agreement.py).
    assert metrics["pairwise_agreement"] == pytest.approx(2 / 4)
    assert metrics["kendall_tau"] == pytest.approx((2 / math.sqrt(6) - 1) / 2)
    inputs = artifact.manifest["inputs"]
    assert {"artifact": "sft-a", "role": "completions"} in inputs and {
        "artifact": "ppo-b",
        "role": "completions",
    } in inputs
    assert {"model": "some/folder", "role": "completions"} in inputs
    assert len(artifact.meta["db_sha256"]) == 64 and artifact.meta["last_label_id"] == 7


def test_the_parquet_copy_loads_with_datasets(labelled, store):
    import datasets

    folder = store.local_path(export_labels(labelled, store)) / "parquet"
    comparisons = datasets.load_dataset(str(folder), "comparisons", split="train")
    assert comparisons.num_rows == 4 and sorted(map(len, comparisons["ranks"])) == [2, 2, 3, 3]
    pairs = datasets.load_dataset(str(folder), "preference_pairs", split="train")
    assert pairs.num_rows == 7 and set(pairs.column_names) >= {"prompt", "chosen", "rejected"}
    assert pairs[0]["chosen"][0]["role"] == "assistant"
    demonstrations = datasets.load_dataset(str(folder), "conversations", split="train")
    assert demonstrations[0]["messages"][0] == {"role": "user", "content": "hi"}


def test_stages_resolve_a_labels_reference_to_the_file_of_their_kind(labelled, store, tmp_path):
    artifact = export_labels(labelled, store)
    path = data_file("labels:latest", "comparison", store)
    assert path == str(store.local_path(artifact) / "comparisons.jsonl")
    assert data_file(artifact.id, "prompt", store).endswith("prompts.jsonl")
    assert data_file(str(store.local_path(artifact)), "conversation", store).endswith("conversations.jsonl")
    assert data_input(path) == {
        "artifact": artifact.id,
        "file": "comparisons.jsonl",
        "sha256": artifact.manifest["files"]["comparisons.jsonl"],
    }
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "hi"}\n')
    assert data_file(str(plain), "prompt", store) == str(plain) and "artifact" not in data_input(str(plain))
    assert data_file("org/dataset", "prompt", store) == "org/dataset"
    payload = tmp_path / "weights"
    payload.mkdir()
    (payload / "model.bin").write_bytes(b"0")
    sft = store.publish("sft", payload, config={})
    with pytest.raises(StoreError, match="has no comparisons.jsonl"):
        data_file(sft.id, "comparison", store)


def test_nothing_to_export_is_an_error(tmp_path, store):
    db = open_db(tmp_path / "empty.db")
    with pytest.raises(LabelError, match="nothing to export"):
        export_labels(db, store)
    assert store.list() == []
