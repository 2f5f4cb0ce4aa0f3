"""`rlhf run`: the three stages as one job on configs/pipeline-tiny-test.yaml with a tiny random model.

One job is killed with SIGKILL inside the reward stage and started again: SFT is skipped (its artifact is
there), the reward stage resumes from its checkpoint, PPO runs. Started once more, every stage is skipped;
with one PPO setting changed, only PPO runs again. The lineage must join the artifacts of this job.

The job also runs once under `accelerate launch` with two processes: the one launch of the suite that checks
every stage on several processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, accelerate_launch, write_tiny_gguf
from safetensors.torch import load_file

from pipeline.checkpoints import checkpoints
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.job import load_job
from pipeline.store import ArtifactStore

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, a busy machine: see conftest

JOB = REPO / "configs" / "pipeline-tiny-test.yaml"


def inputs_by_role(artifact) -> dict[str, str]:
    return {
        item.get("role", ""): item["artifact"] for item in artifact.manifest["inputs"] if "artifact" in item
    }


def test_a_killed_job_continues_and_a_finished_one_is_skipped(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the job file names the demo data relative to the repository
    store = ArtifactStore(tmp_path / "store")
    argv = ["run", "--config", str(JOB), "--store", str(store.root), "--output_dir", str(tmp_path / "runs")]
    # Enough reward steps that the kill, right after its first checkpoint, lands inside the stage; PPO without
    # its held-out evaluation (test_ppo_stage.py covers it), which would take half of this test's time.
    argv += ["--sft.model", str(tiny_model_dir), "--reward.max_steps", "12", "--reward.checkpoint_every", "2"]
    argv += ["--ppo.eval_prompts", "null"]

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
    assert reward.metrics["steps"] == 12
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


def test_two_processes_on_an_empty_store_publish_each_artifact_once(tmp_path, tiny_model_dir, monkeypatch):
    """Two CPU processes run the whole job from a GGUF file (the embedded model's path) on an empty store. The
    main process converts the file and the other waits and reuses its artifact; only the main process
    publishes: one artifact of each kind, joined by their lineage, and each process keeps its own PPO RNG
    state in the checkpoint. The SFT weights equal those of one process taking both processes' batches at
    once, up to float32 rounding: the gradients are summed across processes in another order, and four Adam
    steps carry that difference on."""
    monkeypatch.chdir(REPO)
    gguf = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    store = ArtifactStore(tmp_path / "store")
    common = ["--store", str(store.root), "--output_dir", str(tmp_path / "runs")]
    # Every weight trained (a LoRA factor's Adam step is +-lr wherever its gradient is still rounding noise), and
    # no held-out split: with one, two processes drew their batches in another order than one process did
    # (seen on transformers 5.24, not yet explained: the weights then differ by a few steps' worth).
    sft_args = [
        "--model",
        str(gguf),
        "--lora.enabled",
        "false",
        "--learning_rate",
        "3e-3",
        "--eval_fraction",
        "0",
    ]
    job_args = [f"--sft.{word[2:]}" if word.startswith("--") else word for word in sft_args]
    # PPO with the bottom layer shared (policy and reference, reward and value model) under DDP.
    ppo_args = ["--ppo.eval_prompts", "null", "--ppo.policy_layers", "1", "--ppo.critic_layers", "1"]
    two = accelerate_launch(["run", "--config", str(JOB), *common, *job_args, *ppo_args])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("open the app on the result") == 1
    (base,), (sft,), (reward,), (ppo,) = (store.list(stage) for stage in ("base", "sft", "reward", "ppo"))
    assert inputs_by_role(sft) == {"model": base.id} and inputs_by_role(reward) == {"model": sft.id}
    assert inputs_by_role(ppo) == {"policy": sft.id, "reward": reward.id}
    (checkpoint,) = (tmp_path / "runs").glob("ppo-*/checkpoint-*")  # each process keeps its own RNG state
    assert {path.name for path in checkpoint.glob("rng-*")} == {"rng-0.pt", "rng-1.pt"}

    _, stages = load_job(str(JOB), [], ["sft"])
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(stages["sft"]))
    per_process = stages["sft"]["batch_size"]
    assert (
        main(["sft", "--config", str(config), *common, *sft_args, "--batch_size", str(2 * per_process)]) == 0
    )
    (one,) = [a for a in store.list("sft") if a.id != sft.id]
    assert len(store.list("base")) == 1
    name = "model.safetensors"
    ours, theirs = (load_file(str(Path(a.uri) / name)) for a in (sft, one))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(
            ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}"
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
