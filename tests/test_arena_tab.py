"""The Arena tab's rounds with tiny models: sides drawn server-side, both replies streamed together, names
kept off the page until the vote, one vote per round, and the vote stored with both models' provenance."""

from __future__ import annotations

import json
import random
import threading
from types import SimpleNamespace

import pytest
from app_helpers import label_db
from conftest import build_tiny_llama

from pipeline.app.arena import (
    SIDES,
    Round,
    cast_vote,
    leaderboard_view,
    model_labels,
    new_round,
    pick_sides,
    play,
    round_view,
    side_by_side,
    status_of,
)
from pipeline.app.catalog import ModelCache, RewardModels
from pipeline.app.db import LabelError
from pipeline.app.session import AppSettings
from pipeline.app.votes import Reply, arena_votes, record_arena_vote
from pipeline.generation import SamplingSettings

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLING = SamplingSettings(max_new_tokens=6, temperature=1.0, top_p=1.0)


@pytest.fixture(scope="module")
def arena(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """Settings over a store with two different tiny chat models (an sft and a ppo artifact), and a cache."""
    from pipeline.store import ArtifactStore

    folder = tmp_path_factory.mktemp("arena")
    store = ArtifactStore(folder / "store")
    sft = store.publish("sft", tiny_model_dir, config={})
    other = build_tiny_llama(tiny_tokenizer, folder / "other", seed=5)
    ppo = store.publish("ppo", other, config={})
    settings = AppSettings(db=label_db(folder), store=store)
    return settings, ModelCache(store, engine="hf"), (sft.id, ppo.id)


def growing(text: str):
    for end in range(1, len(text) + 1):
        yield text[:end]


def test_both_replies_grow_together_until_the_longer_one_ends():
    steps = list(side_by_side(growing("abc"), growing("vwxyz")))
    assert steps[:3] == [("a", "v"), ("ab", "vw"), ("abc", "vwx")]
    assert steps[-1] == ("abc", "vwxyz") and len(steps) == 6  # the last step finds both streams ended


def test_anonymous_sides_are_two_different_models_drawn_at_random():
    draws = [
        pick_sides("anonymous", ["m1", "m2", "m3"], (None, None), random.Random(seed)) for seed in range(60)
    ]
    assert all(left != right for left, right in draws)
    assert {left for left, _ in draws} == {"m1", "m2", "m3"} and {right for _, right in draws} == {
        "m1",
        "m2",
        "m3",
    }
    assert ("m1", "m2") in draws and ("m2", "m1") in draws  # each pair comes on either side
    with pytest.raises(LabelError, match="at least two chat models"):
        pick_sides("anonymous", ["m1", "m1"], (None, None), random.Random(0))
    assert pick_sides("named", [], ("m2", "m1"), random.Random(0)) == ("m2", "m1")
    with pytest.raises(LabelError, match="two different models"):
        pick_sides("named", [], ("m1", "m1"), random.Random(0))
    with pytest.raises(LabelError, match="pick a model for each side"):
        pick_sides("named", [], ("m1", None), random.Random(0))
    with pytest.raises(LabelError, match="write a prompt"):
        new_round("anonymous", ["m1", "m2"], (None, None), "  ", SAMPLING, random.Random(0))


def page_text(view: list) -> str:
    """What the page receives of a round view: every output but the state (gr.State stays on the server)."""
    shown = [value.value if hasattr(value, "value") else value for value in view[1:]]
    return json.dumps([str(value) for value in shown])


def test_names_reach_the_page_only_after_the_vote_and_the_round_then_locks(arena):
    settings, cache, refs = arena
    labels = model_labels(settings)
    round_ = new_round("anonymous", list(refs), (None, None), "Name a colour.", SAMPLING, random.Random(3))
    assert {round_.left, round_.right} == set(refs)
    views, updates = [round_view(round_, {}, "Loading the models…")], []
    for update in play(round_, cache):
        updates.append(list(update.replies))
        views.append(round_view(update, labels, status_of(update)))
    assert len(updates) >= 3 and all(text for text in round_.replies)
    for before, after in zip(updates, updates[1:], strict=False):
        assert len(before[0]) <= len(after[0]) and len(before[1]) <= len(after[1])  # each reply only grows
    secret = [*refs, *labels.values(), "sft", "ppo"]
    for view in views:
        text = page_text(view)
        assert not [name for name in secret if name in text], text
        assert view[2:4] == list(SIDES)
    assert all(button.interactive is False for view in views[:-1] for button in view[-4:])
    assert all(button.interactive is True for button in views[-1][-4:])  # both ended: voting opens

    saved = cast_vote(settings, "alice", round_, "right")
    after = round_view(round_, labels, status_of(round_))
    assert (
        after[2] == f"Model A: **{labels[round_.left]}**"
        and after[3] == f"Model B: **{labels[round_.right]}**"
    )
    assert all(button.interactive is False for button in after[-4:]) and "Voted" in after[6]
    with pytest.raises(LabelError, match="has its vote"):
        cast_vote(settings, "alice", round_, "left")
    (vote,) = [v for v in arena_votes(settings.db) if v.label_id == saved.label_id]
    assert vote.verdict == "right" and vote.mode == "anonymous" and vote.user == "alice"
    assert (vote.left.model, vote.right.model) == (round_.left, round_.right)
    assert (vote.left.artifact_id, vote.right.artifact_id) == (round_.left, round_.right)
    assert [vote.left.text, vote.right.text] == round_.replies
    assert vote.left.sampling == vote.right.sampling == {**SAMPLING.__dict__, "seed": round_.sampling["seed"]}
    rows, summary = leaderboard_view(settings, "", rewards=RewardModels(settings.store))
    assert [row[1] for row in rows] == [labels[round_.right], labels[round_.left]] and summary.startswith(
        "1 vote."
    )
    # A named-mode vote the other way round is kept but rates nobody: its voter saw the names first.
    record_arena_vote(settings.db, "alice", "named-vote-key-0001", round_.prompt,
                      Reply("a", round_.left, round_.left), Reply("b", round_.right, round_.right), "left",
                      mode="named")  # fmt: skip
    named_rows, summary = leaderboard_view(settings, "", rewards=RewardModels(settings.store))
    assert named_rows == rows and "1 named-mode vote not rated" in summary


def test_a_round_still_streaming_cannot_be_voted_on(arena):
    settings, cache, refs = arena
    round_ = Round("k" * 22, "named", refs[0], refs[1], [{"role": "user", "content": "Hi"}], {"seed": 1})
    with pytest.raises(LabelError, match="wait until both replies"):
        cast_vote(settings, "alice", round_, "tie")
    with pytest.raises(LabelError, match="no round"):
        cast_vote(settings, "alice", None, "tie")
    view = round_view(round_, model_labels(settings), status_of(round_))
    assert refs[0] in view[2] and refs[1] in view[3]  # named mode: the person picked them, so they are shown


class LockingCache:
    """Streams as ModelCache gives them: each holds its model's lock from its first step to its end."""

    def __init__(self) -> None:
        self.locks = {"m1": threading.Lock(), "m2": threading.Lock()}
        self.acquired: list[str] = []

    def get(self, ref: str):
        return SimpleNamespace(artifact_id=ref)

    def stream(self, ref, messages, settings, seed):
        assert self.locks[ref].acquire(timeout=5), f"waited 5 s for {ref}: the rounds deadlocked"
        self.acquired.append(ref)
        try:
            yield from growing(f"{ref} says hello")
        finally:
            self.locks[ref].release()


def test_two_rounds_of_the_same_models_on_opposite_sides_take_their_locks_in_one_order():
    cache = LockingCache()
    prompt = [{"role": "user", "content": "Hi"}]
    rounds = [Round(f"{i}" * 22, "named", left, right, prompt, {**SAMPLING.__dict__, "seed": 0})
              for i, (left, right) in enumerate([("m1", "m2"), ("m2", "m1")])]  # fmt: skip
    for round_ in rounds:
        *_, last = play(round_, cache)
        assert last.replies == [f"{round_.left} says hello", f"{round_.right} says hello"]  # each on its side
    # m1 first, whichever side it is on: a round waiting for m1 holds nothing another round needs.
    assert cache.acquired == ["m1", "m2", "m1", "m2"]


class FailingCache(LockingCache):
    """m2's stream fails after its first step, while m1's is still going."""

    def stream(self, ref, messages, settings, seed):
        if ref == "m1":
            yield from super().stream(ref, messages, settings, seed)
            return
        yield "m2 starts"
        raise RuntimeError("m2 broke mid-reply")


def test_a_failing_stream_releases_the_other_models_lock_at_once():
    cache = FailingCache()
    round_ = Round(
        "k" * 22, "named", "m1", "m2", [{"role": "user", "content": "Hi"}], {**SAMPLING.__dict__, "seed": 0}
    )
    with pytest.raises(RuntimeError, match="m2 broke") as failure:
        for _ in play(round_, cache):
            pass
    # Gradio keeps the exception, and its traceback the failed frames: the lock must be released when play
    # ends, not when those frames are collected.
    assert failure.traceback, "the failure is kept, as Gradio keeps it"
    assert cache.locks["m1"].acquire(blocking=False), "m1's lock is still held after the round failed"
