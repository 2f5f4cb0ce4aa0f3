"""The artifact store: publish/resolve/lineage, crash atomicity, and a real S3-protocol server (moto)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import object_keys

from pipeline.artifacts_view import render_list, render_show
from pipeline.store import MANIFEST, ArtifactStore, StoreError, dataset_fingerprint

REPO = Path(__file__).resolve().parents[1]

# Run by the crash tests in a child process, which the test kills with SIGKILL while it publishes.
PUBLISHER = """
import sys
from pipeline.store import ArtifactStore
ArtifactStore(sys.argv[1]).publish(sys.argv[2], sys.argv[3], config={"from": "child"})
"""


def make_payload(folder: Path, files: int = 2, size: int = 64) -> Path:
    """A payload folder: `files` files of `size` bytes, one in a subfolder, each with distinct content."""
    for i in range(files):
        path = folder / ("weights" if i == 0 else "") / f"part-{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        block = hashlib.sha256(f"{folder}-{i}".encode()).digest()
        path.write_bytes((block * (size // len(block) + 1))[:size])
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "store")


def publish(store: ArtifactStore, stage: str, folder: Path, files: int = 2, **kwargs):
    kwargs.setdefault("config", {"stage": stage})
    return store.publish(stage, make_payload(folder, files=files), **kwargs)


def start_publisher(root: str, stage: str, payload: Path, env: dict[str, str] | None = None):
    env = (env or os.environ) | {"PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", PUBLISHER, root, stage, str(payload)], env=env)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it exits or never gets there."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the publisher exited before it could be killed midway"
        assert time.monotonic() < deadline, "the publisher never started writing"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


# -- publish and resolve ----------------------------------------------------------------------------


def test_publish_then_resolve_by_id_latest_and_path(store, tmp_path):
    sft = publish(store, "sft", tmp_path / "payload", metrics={"loss": 1.5})

    assert store.resolve(sft.id) == sft
    assert store.resolve("latest", stage="sft") == sft
    assert store.resolve("sft:latest") == sft
    assert store.resolve("sft:latest", stage="sft") == sft
    assert store.resolve(sft.uri) == sft
    assert store.resolve(sft.uri, stage="sft") == sft
    assert store.get(sft.id) == sft
    assert store.local_path(sft) == Path(sft.uri) == tmp_path / "store" / sft.id
    assert sft.metrics == {"loss": 1.5} and sft.meta == {}


def test_resolve_by_relative_path_from_another_store(store, tmp_path, monkeypatch):
    sft = publish(store, "sft", tmp_path / "payload")
    monkeypatch.chdir(tmp_path / "store")
    other = ArtifactStore(tmp_path / "elsewhere")

    found = other.resolve(sft.id)  # a folder in the working directory is a plain path
    assert found.id == sft.id and found.manifest == sft.manifest
    assert other.local_path(found) == Path(sft.uri)
    assert other.resolve(f"./{sft.id}", stage="sft").id == sft.id


def test_list_is_oldest_first_and_filters_by_stage(store, tmp_path):
    published = [
        publish(store, stage, tmp_path / f"p{i}") for i, stage in enumerate(["sft", "reward", "sft", "ppo"])
    ]

    assert store.list() == published
    assert store.list("sft") == [published[0], published[2]]
    assert store.list("reward-model") == []
    assert store.resolve("sft:latest") == published[2]


def test_manifest_records_config_inputs_metrics_meta_checksums_and_code_version(store, tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text('{"messages": []}\n')
    payload = make_payload(tmp_path / "payload", files=3)
    (payload / MANIFEST).write_text('{"id": "an-older-artifact"}')  # a republished folder: replaced
    config = {"lr": 1e-5, "model": {"name": "tiny", "layers": 2}}

    sft = store.publish(
        "sft",
        payload,
        config=config,
        inputs=[dataset_fingerprint(data)],
        metrics={"loss": 0.25},
        meta={"chat_template": "chatml"},
    )

    on_disk = json.loads((Path(sft.uri) / MANIFEST).read_text())
    assert on_disk == sft.manifest
    assert list(on_disk) == [
        "id",
        "stage",
        "created",
        "config",
        "inputs",
        "metrics",
        "meta",
        "files",
        "code_version",
    ]
    assert on_disk["id"] == sft.id and sft.id.startswith("sft-") and on_disk["stage"] == "sft"
    assert on_disk["created"].endswith("+00:00")
    assert on_disk["config"] == config
    assert on_disk["inputs"] == [{"dataset": str(data), "sha256": sha256(data)}]
    assert on_disk["metrics"] == {"loss": 0.25} and on_disk["meta"] == {"chat_template": "chatml"}
    assert on_disk["code_version"] and isinstance(on_disk["code_version"], str)
    assert sorted(on_disk["files"]) == ["part-0001.bin", "part-0002.bin", "weights/part-0000.bin"]
    for name, digest in on_disk["files"].items():
        assert sha256(Path(sft.uri) / name) == digest == sha256(payload / name)


def test_show_renders_lineage_of_a_three_artifact_chain(store, tmp_path):
    demos, rankings = tmp_path / "demos.jsonl", tmp_path / "rankings.jsonl"
    demos.write_text('{"messages": []}\n')
    rankings.write_text('{"prompt": [], "completions": ["a", "b"], "ranks": [0, 1]}\n')
    base = publish(store, "base", tmp_path / "base", inputs=[{"model": "smollm2.gguf", "sha256": "ab" * 32}])
    sft = publish(
        store,
        "sft",
        tmp_path / "sft",
        inputs=[{"artifact": base.id, "role": "base"}, dataset_fingerprint(demos)],
        metrics={"loss": 1.23456789},
    )
    config = {"lr": 3e-5, "beta": 0.1, "model": {"hidden": 16}, "datasets": ["rankings.jsonl"]}
    reward = publish(
        store,
        "reward",
        tmp_path / "reward",
        config=config,
        inputs=[{"artifact": sft.id, "role": "init"}, dataset_fingerprint(rankings)],
        metrics={"accuracy": 0.75, "loss": 0.5},
        meta={"reward_mean": 0.0},
    )

    text = render_show(store, reward)

    lines = text.splitlines()
    start = lines.index("lineage:") + 1
    assert lines[start : start + 6] == [
        f"  {reward.id}  [reward]",
        f"    {sft.id}  [sft]  as init",
        f"      {base.id}  [base]  as base",
        "        model smollm2.gguf  sha256:abababababab",
        f"      dataset {demos}  sha256:{sha256(demos)[:12]}",
        f"    dataset {rankings}  sha256:{sha256(rankings)[:12]}",
    ]
    assert f"id:            {reward.id}" in lines
    assert "stage:         reward" in lines
    assert f"code version:  {reward.manifest['code_version']}" in lines
    assert any(line.startswith("created:       20") and line.endswith(" UTC") for line in lines)
    assert lines[lines.index("metrics:") + 1 : lines.index("metrics:") + 3] == [
        "  accuracy: 0.75",
        "  loss: 0.5",
    ]
    assert "  reward_mean: 0.0" in lines
    config_text = "\n".join(line[2:] for line in lines[lines.index("config:") + 1 :])
    assert yaml.safe_load(config_text) == config


def test_show_marks_ancestors_missing_from_the_store(store, tmp_path):
    sft = publish(
        store, "sft", tmp_path / "sft", inputs=[{"artifact": "base-gone", "role": "base"}], config={}
    )
    lines = render_show(store, sft).splitlines()
    assert "    base-gone  (not in this store)  as base" in lines
    assert "config: none" in lines and "metrics: none" in lines


def test_list_renders_a_table_with_key_metrics(store, tmp_path):
    sft = publish(
        store, "sft", tmp_path / "a", metrics={"loss": 0.123456, "ppl": 3.0, "steps": 10, "extra": 1}
    )
    reward = publish(store, "reward", tmp_path / "b")

    lines = render_list(store.list()).splitlines()

    assert lines[0].split() == ["ID", "STAGE", "CREATED", "(UTC)", "METRICS"]
    assert lines[1].split()[:2] == [sft.id, "sft"]
    assert lines[1].endswith("loss=0.1235  ppl=3  steps=10")
    assert lines[2].split()[:2] == [reward.id, "reward"]
    stage_column = lines[0].index("STAGE")
    assert lines[1][stage_column:].startswith("sft ") and lines[2][stage_column:].startswith("reward ")
    assert render_list([]) == "no artifacts"


# -- errors -----------------------------------------------------------------------------------------


def test_errors_name_the_problem(store, tmp_path):
    with pytest.raises(
        StoreError, match=r"no published 'sft' artifact in store .*store; run `rlhf sft` first"
    ):
        store.resolve("sft:latest")
    with pytest.raises(StoreError, match="`latest` needs a stage"):
        store.resolve("latest")
    sft = publish(store, "sft", tmp_path / "payload")
    with pytest.raises(
        StoreError, match=r"no artifact 'sft-19990101-000000-000000-abcd' in store .*artifacts ls"
    ):
        store.resolve("sft-19990101-000000-000000-abcd")
    with pytest.raises(
        StoreError, match=rf"artifact {sft.id} is a 'sft' artifact, but a 'reward' one is needed"
    ):
        store.resolve(sft.id, stage="reward")
    with pytest.raises(StoreError, match="'sft:latest' names a 'sft' artifact, but a 'reward' one is needed"):
        store.resolve("sft:latest", stage="reward")
    with pytest.raises(StoreError, match="not a published artifact folder"):
        store.resolve(str(tmp_path / "payload"))
    with pytest.raises(StoreError, match="not a published artifact folder"):
        store.resolve("HuggingFaceTB/SmolLM2-135M")  # a Hub id: callers fall back to loading it as one
    with pytest.raises(StoreError, match="cannot open nosuchprotocol://x"):
        store.resolve("nosuchprotocol://x")
    with pytest.raises(StoreError, match="invalid artifact id"):
        store.get("../payload")
    with pytest.raises(StoreError, match="invalid stage name"):
        store.publish("sft:v2", tmp_path / "payload", config={})
    with pytest.raises(StoreError, match="not a folder"):
        store.publish("sft", tmp_path / "missing", config={})


def test_stores_are_isolated_and_hidden_or_unfinished_folders_ignored(tmp_path):
    one, two = ArtifactStore(tmp_path / "one"), ArtifactStore(tmp_path / "one-two")
    assert one.list() == [] and two.list() == []  # roots that do not exist yet
    a = publish(one, "sft", tmp_path / "a")
    b = publish(two, "sft", tmp_path / "b")
    staged = tmp_path / "one" / ".tmp-sft-20990101-000000-000000-ffff"  # newer than a, but hidden
    make_payload(staged)
    (staged / MANIFEST).write_text(json.dumps(a.manifest | {"id": staged.name[5:]}))
    make_payload(tmp_path / "one" / "sft-20990101-000000-000000-eeee")  # no manifest: unfinished

    assert one.list() == [a] and two.list() == [b]
    assert one.resolve("sft:latest") == a and two.resolve("sft:latest") == b
    with pytest.raises(StoreError, match="no artifact"):
        one.get(b.id)
    with pytest.raises(StoreError, match="no artifact"):
        one.get("sft-20990101-000000-000000-eeee")
    with pytest.raises(StoreError, match="hidden folder"):
        one.resolve(str(staged))


def test_killed_local_publish_leaves_no_artifact(store, tmp_path):
    before = publish(store, "sft", tmp_path / "small")
    big = make_payload(tmp_path / "big", files=1000, size=64 << 10)  # each file copied and fsynced: ~1 s
    root = tmp_path / "store"

    proc = start_publisher(str(root), "sft", big)
    kill_when(proc, lambda: any(root.glob(".tmp-*/**/*.bin")))

    staged = list(root.glob(".tmp-*"))
    assert len(staged) == 1 and len(list(staged[0].rglob("*.bin"))) < 1000  # killed midway, left hidden
    assert not (staged[0] / MANIFEST).exists()
    fresh = ArtifactStore(root)
    assert fresh.list() == [before]
    assert fresh.resolve("sft:latest") == before
    with pytest.raises(StoreError):
        fresh.get(staged[0].name[len(".tmp-") :])

    after = publish(fresh, "sft", tmp_path / "later")
    assert fresh.list() == [before, after] and fresh.resolve("sft:latest") == after


# -- a real S3-protocol server ----------------------------------------------------------------------


def test_s3_publish_list_resolve_and_download(s3_root, tmp_path):
    store = ArtifactStore(s3_root)
    assert store.list() == []
    base = publish(store, "base", tmp_path / "base", files=3)
    sft = publish(store, "sft", tmp_path / "sft", inputs=[{"artifact": base.id, "role": "base"}])

    assert sft.uri == f"{s3_root}/{sft.id}"
    assert ArtifactStore(s3_root + "/").list() == [base, sft]
    assert store.resolve("sft:latest") == sft == store.resolve(sft.id, stage="sft")
    assert ArtifactStore(tmp_path / "local").resolve(sft.uri) == sft  # by URL, from any store
    assert store.lineage(sft)["inputs"][0]["id"] == base.id

    folder = store.local_path(base)

    assert folder == tmp_path / "cache" / base.id
    assert json.loads((folder / MANIFEST).read_text()) == base.manifest
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.bin")) == sorted(base.manifest["files"])
    for name, digest in base.manifest["files"].items():
        assert sha256(folder / name) == digest == sha256(tmp_path / "base" / name)
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    assert store.local_path(base) == folder  # cached: no second download
    (folder / MANIFEST).write_text("{}")  # a cached copy that does not match is fetched again
    assert json.loads((store.local_path(base) / MANIFEST).read_text()) == base.manifest


def test_s3_corrupted_or_missing_file_fails_download(s3_root, tmp_path):
    store = ArtifactStore(s3_root)
    sft = publish(store, "sft", tmp_path / "sft", files=3)
    store.fs.pipe_file(f"{store.base}/{sft.id}/part-0001.bin", b"tampered")

    with pytest.raises(StoreError, match=r"part-0001.bin: checksum does not match the manifest"):
        store.local_path(sft)
    assert not list((tmp_path / "cache").iterdir())  # nothing half-downloaded is left to be trusted

    store.fs.rm_file(f"{store.base}/{sft.id}/part-0001.bin")
    with pytest.raises(StoreError, match=r"part-0001.bin: listed in the manifest but missing"):
        store.local_path(sft)


def test_s3_stores_are_isolated(s3_root, tmp_path):
    one, two = ArtifactStore(s3_root), ArtifactStore(s3_root + "-two")
    a = publish(one, "sft", tmp_path / "a")
    b = publish(two, "sft", tmp_path / "b")
    assert one.list() == [a] and two.list() == [b]
    with pytest.raises(StoreError, match="no artifact"):
        one.get(b.id)
    assert ArtifactStore("s3://no-such-bucket/x").list() == []


def test_s3_killed_publish_is_invisible_until_its_manifest(s3_root, s3_endpoint, tmp_path):
    store = ArtifactStore(s3_root)
    before = publish(store, "sft", tmp_path / "small")
    assert store.list() == [before]  # a listing taken before another process writes
    payload = make_payload(tmp_path / "many", files=300, size=16 << 10)
    prefix = s3_root.split("/", 3)[3] + "/"
    # The child finds the endpoint through fsspec's own config, the other documented route.
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL_S3"} | {
        "FSSPEC_S3_ENDPOINT_URL": s3_endpoint
    }

    proc = start_publisher(s3_root, "sft", payload, env)
    kill_when(proc, lambda: len(object_keys(prefix)) > len(before.manifest["files"]) + 1)

    keys = object_keys(prefix)
    orphans = [key for key in keys if not key.startswith(f"{prefix}{before.id}/")]
    assert orphans and not any(key.endswith(MANIFEST) for key in orphans)  # payload up, manifest not
    assert store.list() == [before]
    assert store.resolve("sft:latest") == before
    with pytest.raises(StoreError, match="no artifact"):
        store.get(orphans[0][len(prefix) :].split("/")[0])

    proc = start_publisher(s3_root, "sft", make_payload(tmp_path / "later"), env)
    assert proc.wait(timeout=60) == 0
    after = store.resolve("sft:latest")  # published by another process: no stale listing hides it
    assert after != before and after.manifest["config"] == {"from": "child"}
    assert store.list() == [before, after]
