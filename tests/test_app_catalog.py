"""The app's model catalog and cache: what is offered, in which order, and that a model is loaded once."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
import torch

from pipeline.app.catalog import (
    CHECKPOINT_PREFIX,
    CHECKPOINT_STAGE,
    ModelCache,
    list_models,
    list_reward_models,
    policy_bytes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_checkpoint(run_dir, step: int, score: float):
    """A complete PPO checkpoint folder as the stage lays it out (the files the catalog reads)."""
    folder = run_dir / f"checkpoint-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "policy.safetensors").write_bytes(b"")
    (folder / "state.json").write_text(json.dumps({"history": [{"step": step, "score": score}]}))
    (folder / "run_config.json").write_text("{}")
    return folder


def test_models_are_listed_newest_first_and_a_checkpoint_never_becomes_ppo_latest(
    store, tmp_path, tiny_model_dir
):
    run_dir = tmp_path / "runs" / "ppo-run"
    fake_checkpoint(run_dir, 2, score=0.25)
    (tmp_path / "runs" / "ppo-run" / "checkpoint-000003").mkdir()  # killed while saving: no run_config.json
    base = store.publish("base", tiny_model_dir, config={})
    sft = store.publish("sft", tiny_model_dir, config={}, metrics={"train_loss": 2.5, "eval_loss": 1.25})
    reward = store.publish("reward", tiny_model_dir, config={}, metrics={"eval_accuracy": 0.75})
    ppo = store.publish(
        "ppo", tiny_model_dir, config={}, metrics={"train_score_final": 0.5}, meta={"run_dir": str(run_dir)}
    )
    time.sleep(0.01)
    (run_dir / "checkpoint-000002" / "state.json").touch()  # written after the artifact: listed first
    entries = list_models(store, run_dirs=[run_dir])  # the same run named twice is listed once
    assert [e.stage for e in entries] == [CHECKPOINT_STAGE, "ppo", "sft", "base"]
    assert [e.ref for e in entries[1:]] == [ppo.id, sft.id, base.id]
    checkpoint = entries[0]
    assert checkpoint.ref == f"{CHECKPOINT_PREFIX}{run_dir.resolve() / 'checkpoint-000002'}"
    assert checkpoint.id == "ppo-run/checkpoint-2" and checkpoint.headline == "score 0.25"
    assert entries[2].headline == "eval_loss 1.25" and entries[3].headline == ""
    assert "ppo-checkpoint · ppo-run/checkpoint-2 · " in checkpoint.label
    assert store.resolve("ppo:latest").id == ppo.id
    assert [e.ref for e in list_reward_models(store)] == [reward.id]
    assert list_reward_models(store)[0].headline == "eval_accuracy 0.75"


@pytest.fixture(scope="module")
def tiny_policy(tiny_model_dir, tmp_path_factory):
    from pipeline.generation import load_policy
    from pipeline.store import ArtifactStore

    return load_policy(str(tiny_model_dir), ArtifactStore(tmp_path_factory.mktemp("store")), engine="hf")


class CountingLoader:
    """Loads return a new policy object per call (sharing the tiny model), counted per ref."""

    def __init__(self, policy, delay: float = 0.0):
        self.policy, self.delay, self.calls = policy, delay, []

    def __call__(self, ref: str):
        self.calls.append(ref)
        time.sleep(self.delay)
        return dataclasses.replace(self.policy, source=ref)


def test_the_cache_reuses_a_loaded_model_and_drops_the_least_recently_used(store, tiny_policy):
    loader = CountingLoader(tiny_policy)
    cache = ModelCache(store, max_models=2, loader=loader)
    a = cache.get("a")
    assert cache.get("a") is a and loader.calls == ["a"]
    cache.get("b")
    cache.get("a")  # a is now the most recently used: b goes first
    cache.get("c")
    assert cache.loaded() == ["a", "c"]
    assert cache.get("a") is a and loader.calls == ["a", "b", "c"]
    cache.get("b")
    assert loader.calls == ["a", "b", "c", "b"] and cache.loaded() == ["a", "b"]


def test_the_cache_is_sized_by_memory_too(store, tiny_policy):
    size = policy_bytes(tiny_policy)
    assert (
        size == 2 * sum(p.numel() * 4 for p in tiny_policy.model.parameters())
        or tiny_policy.engine.name == "hf"
    )
    cache = ModelCache(store, max_models=10, max_bytes=int(2.5 * size), loader=CountingLoader(tiny_policy))
    for ref in "abcd":
        cache.get(ref)
    assert cache.loaded() == ["c", "d"]
    alone = ModelCache(store, max_bytes=size // 2, loader=CountingLoader(tiny_policy))
    alone.get("a")
    alone.get("b")
    assert alone.loaded() == ["b"]  # over the budget alone, the newest still stays


def test_two_threads_asking_for_one_model_load_it_once(store, tiny_policy):
    loader = CountingLoader(tiny_policy, delay=0.3)
    cache = ModelCache(store, loader=loader)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("m"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loader.calls == ["m"] and len(got) == 3 and all(p is got[0] for p in got)


@pytest.fixture(scope="module")
def checkpointed(artifact_chain, tmp_path_factory):
    from checkpointed_run import run_with_checkpoints

    return run_with_checkpoints(artifact_chain, tmp_path_factory.mktemp("checkpointed"))


def test_a_ppo_checkpoint_loads_as_the_policy_its_run_published(checkpointed):
    """The run's last checkpoint holds the weights the ppo artifact published: both give the same reply."""
    from pipeline.generation import SamplingSettings

    entries = list_models(checkpointed.store)
    checkpoints = [e for e in entries if e.stage == CHECKPOINT_STAGE]
    assert [e.id for e in checkpoints] == ["ppo-checkpointed/checkpoint-2", "ppo-checkpointed/checkpoint-1"]
    cache = ModelCache(checkpointed.store, engine="hf")
    messages = [{"role": "user", "content": "Hello! How can I help you today?"}]
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    last, first = (list(cache.stream(e.ref, messages, greedy, seed=0))[-1] for e in checkpoints)
    published = list(cache.stream(checkpointed.ppo.id, messages, greedy, seed=0))[-1]
    assert last == published
    policy = cache.get(checkpoints[0].ref)
    assert policy.artifact_id is None and policy.source == checkpoints[0].ref
    # The trained tensors went in: the last checkpoint's weights are the artifact's, not the first's.
    ppo_weights = cache.get(checkpointed.ppo.id).model.state_dict()
    for loaded, expect_equal in ((policy, True), (cache.get(checkpoints[1].ref), False)):
        differences = [
            (tensor - ppo_weights[name]).abs().max().item()
            for name, tensor in loaded.model.state_dict().items()
        ]
        assert (max(differences) < 1e-6) == expect_equal, max(differences)


def test_rlhf_app_sizes_the_model_cache_and_its_threads(monkeypatch, tmp_path):
    from pipeline import cli
    from pipeline.app import server

    built = {}
    monkeypatch.setattr(server, "launch", lambda settings, **where: built.update(settings=settings))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: built.update(threads=n))  # not this process's
    common = ["app", "--store", str(tmp_path / "store"), "--db", str(tmp_path / "labels.db")]
    assert cli.main([*common, "--max-models", "1"]) == 0
    assert built["settings"].max_models == 1 and built["threads"] == 1
    assert cli.main([*common, "--threads", "2"]) == 0 and built["threads"] == 2
    assert cli.main([*common, "--max-models", "0"]) != 0  # one line naming the flag, no server
