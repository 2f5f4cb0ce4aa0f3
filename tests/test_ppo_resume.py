"""Resume: a PPO job killed with SIGKILL after a checkpoint continues to exactly the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from ppo_helpers import build_peaked_policy, build_stopping_policy, publish_tiny_pair, write_config
from safetensors.torch import load_file

from pipeline.checkpoints import checkpoints
from pipeline.cli import main
from pipeline.config import load_config
from stages.ppo.train import Config, run

SETTINGS = dict(steps=8, checkpoint_every=2, keep_checkpoints=2, eval_prompts=None, sample_every=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads spin waiting on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(config: Path, *extra: str) -> subprocess.Popen:
    env = os.environ | {"RLHF_DEBUG": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pipeline.cli", "ppo", "--config", str(config), *extra]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors")) | {
        f"value.{k}": v for k, v in load_file(str(folder / "value" / "adapter_model.safetensors")).items()
    }


def assert_bitwise_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """The same tensors under the same names, bit for bit (one assertion per tensor, naming it)."""
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_killed_run_resumes_to_the_same_weights(store, tiny_tokenizer, tmp_path, capsys):
    policy = build_peaked_policy(tiny_tokenizer, tmp_path / "policy")
    publish_tiny_pair(store, policy, tiny_tokenizer, tmp_path)
    config = write_config(tmp_path / "ppo.yaml", store, **SETTINGS)
    run_dir = tmp_path / "runs" / "killed"

    job = cli(config, "--run_name", "killed")
    while not checkpoints(run_dir) and job.poll() is None:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL, f"the job ended before it could be killed:\n{stderr[-2000:]}"
    assert store.list("ppo") == []
    first = checkpoints(run_dir)[-1]

    # A changed learning rate would alter the run: refused in one line naming it, nothing written.
    capsys.readouterr()
    assert main(["ppo", "--config", str(config), "--run_name", "killed", "--resume", "latest",
                 "--learning_rate", "1e-2"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "learning_rate is 0.01 here but 0.003 in the checkpoint" in err
    assert checkpoints(run_dir)[-1] == first
    # More steps only extend it, a checkpoint cadence only observes it: accepted.
    resumed = cli(
        config, "--run_name", "killed", "--resume", "latest", "--steps", "9", "--checkpoint_every", "3"
    )
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resumed from {first} at step" in stdout and "steps: 8 -> 9" in stdout

    straight = run(load_config(Config, config, ["--run_name", "straight", "--steps", "9"]), store)
    (interrupted,) = [a for a in store.list("ppo") if a.id != straight.id]
    ours, theirs = weights(Path(interrupted.uri)), weights(Path(straight.uri))
    assert_bitwise_equal(ours, theirs)
    assert interrupted.metrics["train_score_final"] == straight.metrics["train_score_final"]


def test_a_fresh_start_sets_an_earlier_runs_checkpoints_aside(store, tiny_tokenizer, tmp_path, capsys):
    """Running the same config twice (as `make demo` does) must not collide with, or mix in, the first
    run's checkpoints: they move aside whole, and the new run folder holds only the new run's."""
    policy = build_peaked_policy(tiny_tokenizer, tmp_path / "policy")
    publish_tiny_pair(store, policy, tiny_tokenizer, tmp_path)
    config = write_config(
        tmp_path / "ppo.yaml", store, steps=2, checkpoint_every=1, keep_checkpoints=2, eval_prompts=None
    )
    cfg = load_config(Config, config, [])
    run(cfg, store)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    first = {p.name: (p / "state.json").read_bytes() for p in checkpoints(run_dir)}
    assert sorted(first) == ["checkpoint-000001", "checkpoint-000002"]

    run(cfg, store)
    (aside,) = [p for p in run_dir.parent.iterdir() if p.name.startswith(f"{cfg.run_name}-")]
    assert {p.name: (p / "state.json").read_bytes() for p in checkpoints(aside)} == first
    assert f"moved to {aside}" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints(run_dir)) == ["checkpoint-000001", "checkpoint-000002"]
    assert len(store.list("ppo")) == 2


def test_a_resumed_run_keeps_the_length_fit_it_started_with(store, tiny_tokenizer, tmp_path, capsys):
    """With length_correction: linear the fit made before step 1 shapes every reward after it: a resume must
    reuse the checkpoint's fit (not sample a new one from the trained policy) and end where a straight run
    ends, bit for bit."""
    policy = build_stopping_policy(tiny_tokenizer, tmp_path / "policy")
    publish_tiny_pair(store, policy, tiny_tokenizer, tmp_path)
    config = write_config(
        tmp_path / "ppo.yaml", store, steps=2, checkpoint_every=1, eval_prompts=None, sample_every=0,
        length_correction="linear", length_calibration=8, batch_size=4, mini_batch_size=4,
    )  # fmt: skip
    run(load_config(Config, config, ["--run_name", "halves", "--steps", "1"]), store)
    assert "length correction:" in capsys.readouterr().out
    resumed = run(load_config(Config, config, ["--run_name", "halves", "--resume", "latest"]), store)
    assert "length correction:" not in capsys.readouterr().out, (
        "the resumed run fitted the length trend again"
    )
    straight = run(load_config(Config, config, ["--run_name", "straight"]), store)

    fit = {k: v for k, v in straight.metrics.items() if k.startswith("length_fit_")}
    assert fit and {k: resumed.metrics[k] for k in fit} == fit
    ours, theirs = weights(Path(resumed.uri)), weights(Path(straight.uri))
    assert_bitwise_equal(ours, theirs)


def test_a_run_without_a_value_model_resumes_to_the_same_weights(store, tiny_tokenizer, tmp_path):
    """With advantage: rloo a checkpoint holds the policy alone; resumed, the run still ends bit for bit where
    a straight one ends, its replies drawn in the same groups of one prompt."""
    policy = build_peaked_policy(tiny_tokenizer, tmp_path / "policy")
    publish_tiny_pair(store, policy, tiny_tokenizer, tmp_path)
    config = write_config(
        tmp_path / "ppo.yaml", store, steps=2, checkpoint_every=1, eval_prompts=None, sample_every=0,
        advantage="rloo", samples_per_prompt=4, batch_size=8, mini_batch_size=4,
    )  # fmt: skip
    run(load_config(Config, config, ["--run_name", "halves", "--steps", "1"]), store)
    resumed = run(load_config(Config, config, ["--run_name", "halves", "--resume", "latest"]), store)
    straight = run(load_config(Config, config, ["--run_name", "straight"]), store)

    assert not (Path(resumed.uri) / "value").exists()
    ours = load_file(str(Path(resumed.uri) / "adapter_model.safetensors"))
    theirs = load_file(str(Path(straight.uri) / "adapter_model.safetensors"))
    assert_bitwise_equal(ours, theirs)
    # peft starts B at zero: a non-zero B shows it trained
    assert any(v.abs().max() > 0 for k, v in ours.items() if "lora_B" in k)
    assert resumed.metrics["train_score_final"] == straight.metrics["train_score_final"]
