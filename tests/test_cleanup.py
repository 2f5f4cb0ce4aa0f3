"""`rlhf artifacts rm` and `gc`: lineage kept whole, label references honoured, safe on a local folder and S3."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_store import make_payload

from pipeline.cleanup import execute, plan_gc, plan_rm
from pipeline.cli import main as cli_main
from pipeline.store import MANIFEST, Artifact, ArtifactStore, StoreError, new_artifact_id

DAY = 86400.0


def publish(store: ArtifactStore, stage: str, folder: Path, parents=(), **meta) -> Artifact:
    inputs = [{"artifact": p.id, "role": "model"} for p in parents]
    return store.publish(stage, make_payload(folder), config={}, inputs=inputs, meta=meta)


def backdate(store: ArtifactStore, artifact: Artifact, days: float) -> Artifact:
    """The artifact as if published `days` ago (its manifest's `created`)."""
    when = datetime.now(timezone.utc) - timedelta(days=days)
    manifest = artifact.manifest | {"created": when.isoformat(timespec="microseconds")}
    store.fs.pipe_file(f"{store.base}/{artifact.id}/{MANIFEST}", json.dumps(manifest).encode())
    return store.get(artifact.id)


def folder_at(path: Path, mtime: float) -> Path:
    """A folder with one file, both last written at `mtime`."""
    path.mkdir(parents=True)
    (path / "state.json").write_text("{}")
    for item in (path / "state.json", path):
        os.utime(item, (mtime, mtime))
    return path


@pytest.fixture
def lineage(store, tmp_path):
    """base <- sft <- reward, and ppo built from both sft and reward."""
    base = publish(store, "base", tmp_path / "base")
    sft = publish(store, "sft", tmp_path / "sft", [base])
    reward = publish(store, "reward", tmp_path / "reward", [sft])
    ppo = publish(store, "ppo", tmp_path / "ppo", [sft, reward])
    return base, sft, reward, ppo


def test_rm_refuses_while_others_depend_and_names_them(store, lineage, capsys):
    base, sft, reward, ppo = lineage
    assert cli_main(["artifacts", "rm", sft.id, "--store", str(store.root)]) == 2
    error = capsys.readouterr().err
    assert (
        f"cannot remove {sft.id}" in error and f"{reward.id} (reward)" in error and f"{ppo.id} (ppo)" in error
    )
    assert "--with-dependants" in error and error.count("\n") == 1  # one line, no traceback
    assert store.list() == [base, sft, reward, ppo]


def test_rm_with_dependants_removes_them_first(store, lineage, capsys):
    base, sft, reward, ppo = lineage
    plan = plan_rm(store, sft.id, references={}, with_dependants=True)
    assert [item.name for item in plan.items] == [ppo.id, reward.id, sft.id]  # dependants before parents
    assert all(item.size > 0 for item in plan.items)
    assert cli_main(["artifacts", "rm", sft.id, "--with-dependants", "--store", str(store.root)]) == 0
    assert "frees" in capsys.readouterr().out
    assert store.list() == [base]
    assert sorted(p.name for p in Path(store.root).iterdir()) == [base.id]


def test_rm_refuses_what_the_label_database_references(store, lineage):
    base, sft, reward, ppo = lineage
    references = {reward.id: ["3 generated completions", "arena model"]}
    with pytest.raises(
        StoreError, match=rf"label database references \({reward.id}: 3 generated completions, arena"
    ):
        plan_rm(store, sft.id, references=references, with_dependants=True)
    assert [item.name for item in plan_rm(store, ppo.id, references=references).items] == [ppo.id]


def test_rm_dry_run_removes_nothing(store, lineage, capsys):
    *_, ppo = lineage
    assert cli_main(["artifacts", "rm", "ppo:latest", "--dry-run", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert ppo.id in out and "would free" in out
    assert store.get(ppo.id) == ppo


def test_a_killed_rm_leaves_nothing_listed_and_gc_finishes_it(store, lineage):
    base, sft, reward, ppo = lineage
    store.fs.rm_file(
        f"{store.base}/{ppo.id}/{MANIFEST}"
    )  # what rm has done when killed after its first delete
    assert ppo.id not in [a.id for a in store.list()]
    with pytest.raises(StoreError, match="no published 'ppo' artifact"):
        store.resolve("ppo:latest")
    assert store.unfinished() == [ppo.id]
    assert plan_gc(store, references={}, keep_days=30).items == []  # written just now: maybe still uploading
    later = datetime.now(timezone.utc) + timedelta(hours=7)
    (item,) = plan_gc(store, references={}, keep_days=30, now=later).items
    assert (item.kind, item.name) == ("unfinished", ppo.id)


def test_gc_removes_old_unneeded_artifacts_checkpoints_and_quiet_unfinished_folders(store, tmp_path, capsys):
    now = time.time()
    runs = tmp_path / "runs"
    base = backdate(store, publish(store, "base", tmp_path / "p0"), 90)
    sft_a = backdate(store, publish(store, "sft", tmp_path / "p1", [base]), 80)
    ppo_a = backdate(store, publish(store, "ppo", tmp_path / "p2", [sft_a], run_dir=str(runs / "ppo-a")), 79)
    sft_b = backdate(store, publish(store, "sft", tmp_path / "p3", [base]), 60)  # the newest sft
    reward_a = backdate(store, publish(store, "reward", tmp_path / "p4", [sft_b]), 50)  # labels need it
    reward_b = backdate(store, publish(store, "reward", tmp_path / "p5", [sft_b]), 40)
    ppo_b = publish(store, "ppo", tmp_path / "p6", [sft_b, reward_b], run_dir=str(runs / "ppo-b"))
    labels = backdate(store, publish(store, "labels", tmp_path / "p7"), 5)  # younger than keep_days
    labels_new = publish(store, "labels", tmp_path / "p8")
    old_checkpoint = folder_at(runs / "ppo-a" / "checkpoint-10", now - 80 * DAY)
    finished = folder_at(runs / "ppo-b" / "checkpoint-5", now - 3600)
    newer_run = folder_at(
        runs / "ppo-b" / "checkpoint-2", now + 60
    )  # a run started after ppo_b was published
    events = folder_at(runs / "ppo-a" / "tensorboard", now - 80 * DAY)
    quiet = folder_at(Path(store.root) / f".tmp-{new_artifact_id('sft')}", now - 8 * 3600)
    busy = folder_at(Path(store.root) / new_artifact_id("reward"), now - 600)
    not_ours = folder_at(Path(store.root) / "runs", now - 90 * DAY)
    references = {reward_a.id: ["12 generated completions"]}

    plan = plan_gc(store, references=references, keep_days=30)

    assert [(i.kind, i.name) for i in plan.items] == [
        ("artifact", ppo_a.id),  # not the newest ppo, nothing depends on it
        ("artifact", sft_a.id),  # its only dependant goes first
        ("checkpoint", str(old_checkpoint)),
        ("checkpoint", str(finished)),
        ("unfinished", quiet.name),
    ]
    store_root = ["--store", str(store.root)]
    assert cli_main(["artifacts", "gc", "--keep-days", "30", "--dry-run", *store_root]) == 0
    assert "would free" in capsys.readouterr().out and old_checkpoint.exists() and store.get(ppo_a.id)
    execute(store, plan)
    assert store.list() == [base, sft_b, reward_a, reward_b, labels, ppo_b, labels_new]
    assert not old_checkpoint.exists() and not finished.exists() and not quiet.exists()
    assert newer_run.exists() and busy.exists() and not_ours.exists() and events.exists()  # curves stay


def test_gc_with_runs_removes_the_run_folders_of_what_it_removes(store, tmp_path):
    runs = tmp_path / "runs"
    sft_a = backdate(store, publish(store, "sft", tmp_path / "p1", run_dir=str(runs / "sft-a")), 40)
    folder_at(runs / "sft-a" / "checkpoint-3", time.time() - 40 * DAY)
    shared = str(runs / "ppo")  # a PPO run name reused: the folder also holds the kept run's curves
    ppo_a = backdate(store, publish(store, "ppo", tmp_path / "p2", run_dir=shared), 40)
    publish(store, "sft", tmp_path / "p3")
    publish(store, "ppo", tmp_path / "p4", run_dir=shared)
    (runs / "ppo").mkdir()

    plan = plan_gc(store, references={}, keep_days=30, with_runs=True)

    assert [(i.kind, i.name) for i in plan.items] == [
        ("artifact", sft_a.id),
        ("artifact", ppo_a.id),
        ("run", str(runs / "sft-a")),  # whole, checkpoints included
    ]


def test_s3_rm_and_gc(s3_root, tmp_path):
    store = ArtifactStore(s3_root)
    base = publish(store, "base", tmp_path / "base")
    sft = publish(store, "sft", tmp_path / "sft", [base])
    store.local_path(sft)  # a downloaded copy, which goes with the artifact
    assert (tmp_path / "cache" / sft.id).is_dir()
    with pytest.raises(StoreError, match=f"{sft.id} \\(sft\\) depend on it"):
        plan_rm(store, base.id, references={})
    assert cli_main(["artifacts", "rm", base.id, "--with-dependants", "--store", s3_root]) == 0
    assert store.list() == [] and not store.fs.exists(f"{store.base}/{sft.id}")
    assert not (tmp_path / "cache" / sft.id).exists()

    unfinished = new_artifact_id("sft")
    make_payload(tmp_path / "half")
    store.fs.put_file(str(tmp_path / "half" / "part-0001.bin"), f"{store.base}/{unfinished}/part-0001.bin")
    assert store.unfinished() == [unfinished]
    assert plan_gc(store, references={}, keep_days=30).items == []  # another machine may be uploading it
    later = datetime.now(timezone.utc) + timedelta(hours=7)
    plan = plan_gc(store, references={}, keep_days=30, now=later)
    assert [(i.kind, i.name) for i in plan.items] == [("unfinished", unfinished)] and plan.items[0].size == 64
    execute(store, plan)
    assert store.unfinished() == [] and not store.fs.exists(f"{store.base}/{unfinished}")
