"""The label database and its queue: passwords, where the file lies, leases, idempotent submits, undo."""

from __future__ import annotations

import json
import sqlite3

import pytest

from pipeline.app import tasks
from pipeline.app.db import LabelError, artifact_references, default_db_path, open_db
from pipeline.app.tasks import Completion, NewTask
from pipeline.app.users import add_user, get_user, hash_password, password_matches, set_password, verify_login

PROMPT = [{"role": "user", "content": "How long do I boil an egg?"}]


@pytest.fixture()
def db(tmp_path):
    db = open_db(tmp_path / "labels.db", app_version="test")
    for name in ("ann", "ben", "cat"):
        add_user(db, name, "annotator", f"{name}-password")
    add_user(db, "root", "admin", "root-password")
    return db


def rank_task(k: int = 4, source: str = "test:1") -> NewTask:
    return NewTask(
        "rank", PROMPT, source, [Completion(f"reply {i}", "sft-x", "sft-x", {"seed": i}) for i in range(k)]
    )


def test_passwords_are_salted_scrypt_hashes(db):
    first, second = hash_password("same-password"), hash_password("same-password")
    assert first.startswith("scrypt$16384$8$1$") and first != second  # a fresh salt each time
    assert password_matches("same-password", second) and not password_matches("same-passwore", second)
    assert verify_login(db, "ann", "ann-password")
    assert not verify_login(db, "ann", "ben-password") and not verify_login(db, "nobody", "ann-password")
    set_password(db, "ann", "a-new-password")
    assert verify_login(db, "ann", "a-new-password") and not verify_login(db, "ann", "ann-password")
    stored = sqlite3.connect(db.path).execute("SELECT password_hash FROM users").fetchall()
    assert all("password" not in row[0] for row in stored)
    with pytest.raises(LabelError, match="too short"):
        add_user(db, "dan", "annotator", "short")
    with pytest.raises(LabelError, match="exists already"):
        add_user(db, "ann", "annotator", "long-enough")
    assert get_user(db, "root").is_admin and not get_user(db, "ann").is_admin


def test_database_lies_beside_a_local_store_and_is_refused_on_s3(tmp_path):
    from pipeline.store import ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "x.txt").write_text("x")
    artifact = store.publish("sft", payload, config={})
    path = default_db_path(store.root)
    assert path == tmp_path / "store" / "labels.db"
    open_db(path)
    assert [a.id for a in store.list()] == [artifact.id]  # the store ignores the database file
    with pytest.raises(LabelError, match="--db PATH"):
        default_db_path("s3://bucket/prefix")


def test_a_task_goes_to_at_most_overlap_annotators_and_never_twice_to_one(db):
    (task_id,) = tasks.add_tasks(db, [rank_task()], overlap=2)
    ann, ben = tasks.lease(db, "ann", "rank", now=0), tasks.lease(db, "ben", "rank", now=0)
    assert ann.task_id == ben.task_id == task_id and ann.key != ben.key
    assert tasks.lease(db, "ann", "rank", now=1).key == ann.key  # asking again: the same lease
    assert tasks.lease(db, "cat", "rank", now=1) is None  # both places are held
    tasks.submit_ranking(db, "ann", ann.key, [1, 2, 3, 4], [[]] * 4, now=2)
    assert tasks.lease(db, "ann", "rank", now=3) is None  # done it: not again
    assert tasks.lease(db, "cat", "rank", now=3) is None  # ben still holds the other place
    tasks.skip(db, "ben", ben.key, now=4)
    assert tasks.lease(db, "ben", "rank", now=5) is None  # skipped: not offered to ben again
    cat = tasks.lease(db, "cat", "rank", now=5)
    assert cat.task_id == task_id
    with pytest.raises(LabelError, match="skipped"):
        tasks.submit_ranking(db, "ben", ben.key, [1, 1, 1, 1], [[]] * 4, now=6)


def test_an_expired_lease_frees_its_place_and_is_refused_once_taken(db):
    tasks.add_tasks(db, [rank_task()], overlap=1)
    ann = tasks.lease(db, "ann", "rank", lease_seconds=10, now=0)
    assert tasks.lease(db, "ben", "rank", lease_seconds=10, now=9) is None
    late = tasks.lease(db, "ann", "rank", lease_seconds=10, now=11)  # a new lease: the old one expired
    assert late.key != ann.key
    # The first lease's place now belongs to the newer one: submitting the expired key would overfill.
    with pytest.raises(LabelError, match="expired"):
        tasks.submit_ranking(db, "ann", ann.key, [1, 2, 3, 4], [[]] * 4, now=12)
    assert tasks.submit_ranking(db, "ann", late.key, [1, 2, 3, 4], [[]] * 4, now=12).duplicate is False


def test_an_expired_lease_is_accepted_while_the_task_has_room(db):
    tasks.add_tasks(db, [rank_task()], overlap=2)
    ann = tasks.lease(db, "ann", "rank", lease_seconds=10, now=0)
    tasks.lease(db, "ben", "rank", lease_seconds=10, now=15)  # one other holder; two places
    saved = tasks.submit_ranking(db, "ann", ann.key, [1, 2, 3, 4], [[]] * 4, now=20)
    assert not saved.duplicate


def test_tiers_given_in_shown_order_are_stored_by_completion(db):
    tasks.add_tasks(db, [rank_task(k=4)], overlap=1)
    lease = tasks.lease(db, "ann", "rank")
    assert sorted(lease.shown_order) == [0, 1, 2, 3]
    assert lease.shown == [f"reply {position}" for position in lease.shown_order]
    tiers_shown = [1, 1, 2, 4]  # the first two shown are tied best
    flags_shown = [["harmful"], [], [], ["not English", "untruthful"]]
    first = tasks.submit_ranking(db, "ann", lease.key, tiers_shown, flags_shown, " noted ")
    again = tasks.submit_ranking(db, "ann", lease.key, [4, 3, 2, 1], [[]] * 4, "changed")
    assert again == tasks.Submitted(first.label_id, lease.key, duplicate=True)
    body = json.loads(sqlite3.connect(db.path).execute("SELECT body FROM labels").fetchone()[0])
    for slot, position in enumerate(lease.shown_order):
        assert body["tiers"][position] == tiers_shown[slot]
    assert body["flags"][lease.shown_order[3]] == ["untruthful", "not English"]  # in FLAGS order
    assert body["note"] == "noted"
    assert tasks.ranks_from_tiers([1, 1, 2, 4]) == [0, 0, 1, 2]
    assert tasks.ranks_from_tiers([3, 1, 3, 2]) == [2, 0, 2, 1]
    assert sqlite3.connect(db.path).execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 1


def test_a_ranking_must_place_every_response(db):
    tasks.add_tasks(db, [rank_task(k=3)], overlap=1)
    lease = tasks.lease(db, "ann", "rank")
    with pytest.raises(LabelError, match="B, C not placed"):
        tasks.submit_ranking(db, "ann", lease.key, [1, None, None], [[]] * 3)
    with pytest.raises(LabelError, match="tier must be 1 to 3"):
        tasks.submit_ranking(db, "ann", lease.key, [1, 2, 4], [[]] * 3)
    with pytest.raises(LabelError, match="no such lease of yours"):
        tasks.submit_ranking(db, "ben", lease.key, [1, 2, 3], [[]] * 3)


def test_undo_retracts_appends_and_gives_the_task_back_as_ranked(db):
    tasks.add_tasks(db, [rank_task()], overlap=1)
    lease = tasks.lease(db, "ann", "rank")
    tasks.submit_ranking(db, "ann", lease.key, [2, 1, 1, 3], [[], ["harmful"], [], []], "first try")
    with pytest.raises(LabelError, match="not one of yours"):
        tasks.undo(db, "ben", lease.key)
    again = tasks.undo(db, "ann", lease.key)
    assert (
        again.task_id == lease.task_id and again.key != lease.key and again.shown_order == lease.shown_order
    )
    assert again.previous == {"tiers": [2, 1, 1, 3], "flags": [[], ["harmful"], [], []], "note": "first try"}
    assert tasks.undo(db, "ann", lease.key).key == again.key  # a second click: one retraction
    conn = sqlite3.connect(db.path)
    assert conn.execute("SELECT COUNT(*) FROM retractions").fetchone()[0] == 1
    assert conn.execute("SELECT labelled FROM tasks").fetchone()[0] == 0
    tasks.submit_ranking(db, "ann", again.key, [1, 2, 2, 3], [[]] * 4)
    assert conn.execute("SELECT COUNT(*) FROM live_labels").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 2  # the undone one stays, retracted
    for statement in ("UPDATE labels SET seconds = 1", "DELETE FROM labels", "DELETE FROM retractions"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(statement)


def test_an_admin_discards_with_a_reason_and_the_place_reopens_for_others(db):
    tasks.add_tasks(db, [rank_task()], overlap=1)
    lease = tasks.lease(db, "ann", "rank")
    saved = tasks.submit_ranking(db, "ann", lease.key, [1, 2, 3, 4], [[]] * 4)
    with pytest.raises(LabelError, match="only admins"):
        tasks.discard(db, "ben", saved.label_id, "spam")
    with pytest.raises(LabelError, match="reason"):
        tasks.discard(db, "root", saved.label_id, " ")
    tasks.discard(db, "root", saved.label_id, "ranked at random")
    assert tasks.lease(db, "ann", "rank") is None  # a discarded label still counts as having done it
    assert tasks.lease(db, "ben", "rank").task_id == lease.task_id


def test_dialogues_are_validated_and_stored_once(db):
    key = "k" * 22
    with pytest.raises(LabelError, match="must end with an assistant turn"):
        tasks.submit_dialogue(db, "ann", key, [{"role": "user", "content": "hi"}], as_prompt=False)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    first = tasks.submit_dialogue(db, "ann", key, messages, as_prompt=False, suggested_by=["sft-1"])
    assert tasks.submit_dialogue(db, "ann", key, [], as_prompt=False).label_id == first.label_id
    with pytest.raises(LabelError, match="another annotator"):
        tasks.submit_dialogue(db, "ben", key, messages, as_prompt=False)
    (write_task,) = tasks.add_tasks(db, [NewTask("write", PROMPT, "test:2")])
    lease = tasks.lease(db, "ben", "write")
    with pytest.raises(LabelError, match="start with that prompt"):
        tasks.submit_dialogue(db, "ben", lease.key, messages, as_prompt=False)
    reply = [*PROMPT, {"role": "assistant", "content": "Six minutes."}]
    assert tasks.submit_dialogue(db, "ben", lease.key, reply, as_prompt=False).label_id > first.label_id
    assert tasks.lease(db, "ben", "write") is None
    assert artifact_references(db.path) == {"sft-1": ["suggested drafts of 1 demonstrations"]}


def test_artifact_references_name_the_models_behind_the_completions(db):
    assert artifact_references(db.path.parent / "missing.db") == {}
    tasks.add_tasks(db, [rank_task(k=2, source="a"), rank_task(k=3, source="b")])
    imported = NewTask("rank", PROMPT, "c", [Completion("x"), Completion("y", "some/folder")])
    tasks.add_tasks(db, [imported])
    assert artifact_references(db.path) == {"sft-x": ["generated 5 completions in 2 ranking tasks"]}
