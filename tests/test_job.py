"""`rlhf run`: the three stages as one job on configs/pipeline-tiny-test.yaml with a tiny random model.

One job is killed with SIGKILL inside the reward stage and started again: SFT is skipped (its artifact is
there), the reward stage resumes from its checkpoint, PPO runs. Started once more, every stage is skipped;
with one PPO setting changed, only PPO runs again. The lineage must join the artifacts of this job.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from pipeline.checkpoints import checkpoints
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.job import load_job
from pipeline.store import ArtifactStore

JOB = REPO / "configs" / "pipeline-tiny-test.yaml"


def inputs_by_role(artifact) -> dict[str, str]:
    return {
        item.get("role", ""): item["artifact"] for item in artifact.manifest["inputs"] if "artifact" in item
    }


def test_a_killed_job_continues_and_a_finished_one_is_skipped(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the job file names the demo data relative to the repository
    store = ArtifactStore(tmp_path / "store")
    argv = ["run", "--config", str(JOB), "--store", str(store.root), "--output_dir", str(tmp_path / "runs")]
    # Enough reward steps that the kill, right after its first checkpoint, lands inside the stage.
    argv += ["--sft.model", str(tiny_model_dir), "--reward.max_steps", "40", "--reward.checkpoint_every", "3"]

    env = os.environ | {"RLHF_DEBUG": "1", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    runs = tmp_path / "runs"
    while job.poll() is None and not any(checkpoints(p) for p in runs.glob("reward-*")):
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    (sft,) = store.list("sft")
    assert store.list("reward") == [] and store.list("ppo") == []

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"== sft: skipped, {sft.id} was built from the same config and inputs" in out
    assert "== reward: resuming in" in out and "resumed from" in out
    (reward,), (ppo,) = store.list("reward"), store.list("ppo")
    assert reward.metrics["steps"] == 40
    assert inputs_by_role(reward) == {"model": sft.id}
    assert inputs_by_role(ppo) == {"policy": sft.id, "reward": reward.id}
    table = out[out.index("stage   artifact") :]
    for artifact, status in ((sft, "skipped"), (reward, "resumed"), (ppo, "ran")):
        assert re.search(rf"^{artifact.stage} +{artifact.id} +{status} ", table, re.MULTILINE), table
    assert "eval_loss" in table and "eval_accuracy" in table
    assert table.rstrip().endswith(f"rlhf app --store {store.root}")

    assert main(argv) == 0  # the same job again: nothing to do
    assert capsys.readouterr().out.count("skipped, ") == 3
    assert len(store.list()) == 3

    assert main([*argv, "--ppo.learning_rate", "2e-4"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped, ") == 2 and "== ppo: running in" in out
    first, second = store.list("ppo")
    assert (
        inputs_by_role(second) == inputs_by_role(first) and second.manifest["config"]["learning_rate"] == 2e-4
    )


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("sft: configs/sft-tiny-test.yaml\n", ["--reward.max_steps", "3"], "--reward.* overrides a stage"),
        ("store: s\n", [], "names no stage"),
        ("sft: configs/missing.yaml\n", [], "sft: config file not found: configs/missing.yaml"),
        ("stages: [sft]\n", [], "unknown key 'stages' for JobConfig"),
    ],
)
def test_job_files_are_checked_like_stage_configs(tmp_path, text, overrides, message, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        load_job(str(path), overrides, ["sft", "reward", "ppo"])
