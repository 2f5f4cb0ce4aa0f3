"""Resume for stages 1 and 2: a job killed with SIGKILL continues from its checkpoint to the weights of an
uninterrupted run, and a resume refuses settings that would change the run it continues.

The weights are compared exactly: the resumed run replays the same operations on the same data in the same
order, from restored weights, optimizer, schedule and RNG states, in one thread (as the killed process ran),
so nothing but a mistake can move a bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_reward_stage import learnable_comparisons, publish_sft, write_jsonl
from test_sft import write_conversations

from pipeline.checkpoints import (
    CONFIG_FILE,
    check_resume_config,
    checkpoints,
    resolve_resume,
    set_peak_learning_rate,
)
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.store import ArtifactStore

pytestmark = pytest.mark.usefixtures("one_thread")  # as the killed process ran: the sums in the same order


def start(argv: list[str]) -> subprocess.Popen:
    env = os.environ | {"RLHF_DEBUG": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after_first_checkpoint(job: subprocess.Popen, run_dir: Path) -> Path:
    while not checkpoints(run_dir) and job.poll() is None:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL, f"the job ended before it could be killed:\n{stderr[-3000:]}"
    return checkpoints(run_dir)[-1]


@contextmanager
def counting_forwards() -> Iterator[list[str]]:
    """Every forward pass through a Llama trunk while inside: one per training step here, so a resumed run
    shows that it trained only the steps after its checkpoint (a restart from scratch ends equal too)."""
    calls: list[str] = []

    def count(module, args):
        if type(module).__name__ == "LlamaModel":
            calls.append(type(module).__name__)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        yield calls
    finally:
        hook.remove()


def tensors(store: ArtifactStore, artifact_id: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(store.local_path(store.get(artifact_id)) / name))


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_killed_sft_run_resumes_to_the_same_weights(tmp_path, tiny_model_dir, capsys):
    store = ArtifactStore(tmp_path / "store")
    data = write_conversations(tmp_path / "conversations.jsonl", n=64)
    args = ["sft", "--config", str(REPO / "configs" / "sft-tiny-test.yaml"), "--store", str(store.root)]
    args += ["--model", str(tiny_model_dir), "--data", str(data), "--output_dir", str(tmp_path / "runs")]
    args += ["--lora.enabled", "true", "--lora.r", "4", "--batch_size", "4", "--max_steps", "30"]
    args += ["--eval_fraction", "0", "--checkpoint_every", "4", "--keep_checkpoints", "1"]

    first = kill_after_first_checkpoint(start([*args, "--run_name", "killed"]), tmp_path / "runs" / "killed")
    assert store.list("sft") == []
    # A setting that changes the run is refused before any model is loaded, naming the key and the fix.
    assert main([*args, "--run_name", "killed", "--resume", "latest", "--learning_rate", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "learning_rate is 0.001 here but 0.003 in the checkpoint" in err
    assert "--learning_rate 0.003" in err and "--force" in err

    # More steps and other cadences only extend and observe the run: accepted, and said.
    with counting_forwards() as resumed:
        assert main([*args, "--run_name", "killed", "--resume", "latest", "--max_steps", "32"]) == 0
    out = capsys.readouterr().out
    step = int(first.name.split("-")[1])
    assert f"resumed from {first} at step {step}" in out and "max_steps: 30 -> 32" in out
    with counting_forwards() as straight:
        assert main([*args, "--run_name", "straight", "--max_steps", "32", "--checkpoint_every", "0"]) == 0
    assert len(straight) - len(resumed) == step

    interrupted, straight = (a.id for a in store.list("sft"))
    assert store.get(interrupted).metrics["train_steps"] == 32
    name = "adapter_model.safetensors"
    assert_same_tensors(tensors(store, interrupted, name), tensors(store, straight, name))


def test_killed_reward_run_resumes_to_the_same_weights(tmp_path, tiny_model_dir, capsys):
    store = ArtifactStore(tmp_path / "store")
    sft_id = publish_sft(store, tiny_model_dir)
    data = write_jsonl(tmp_path / "comparisons.jsonl", learnable_comparisons(80, seed=11))
    args = ["reward", "--config", str(REPO / "configs" / "reward-tiny-test.yaml"), "--store", str(store.root)]
    args += ["--model", sft_id, "--data", str(data), "--normalise_on", "null", "--max_steps", "40"]
    args += ["--groups_per_batch", "4", "--eval_every", "0", "--output_dir", str(tmp_path / "runs")]
    args += ["--checkpoint_every", "3", "--lr_scheduler", "cosine", "--warmup_steps", "4"]

    first = kill_after_first_checkpoint(start([*args, "--run_name", "killed"]), tmp_path / "runs" / "killed")
    assert store.list("reward") == []
    assert (first / CONFIG_FILE).is_file() and (first / "rng-0.pt").is_file()
    assert main([*args, "--run_name", "killed", "--resume", "latest", "--lora.r", "4"]) == 2
    assert "lora.r is 4 here but 8 in the checkpoint" in capsys.readouterr().err

    with counting_forwards() as resumed:
        assert main([*args, "--run_name", "killed", "--resume", str(first), "--logging_every", "1"]) == 0
    assert f"resumed from {first}" in capsys.readouterr().out
    with counting_forwards() as straight:
        assert main([*args, "--run_name", "straight", "--checkpoint_every", "0"]) == 0
    assert len(straight) - len(resumed) == int(first.name.split("-")[1])

    interrupted, straight = (store.get(a.id) for a in store.list("reward"))
    assert interrupted.metrics["steps"] == 40
    assert interrupted.metrics["train_loss"] == straight.metrics["train_loss"]
    name = "adapter_model.safetensors"
    assert_same_tensors(tensors(store, interrupted.id, name), tensors(store, straight.id, name))


def test_forced_changes_are_listed_and_observers_pass():
    saved = {"learning_rate": 1e-4, "steps": 10, "max_steps": 10, "eval_every": 5, "lora": {"r": 8}}
    grown = saved | {"steps": 20, "eval_every": 2, "report_to": ["tensorboard", "wandb"]}
    assert check_resume_config(saved, grown, force=False, checkpoint=Path("c")) == [
        "eval_every: 5 -> 2",
        "report_to: '<unset>' -> ['tensorboard', 'wandb']",
        "steps: 10 -> 20",
    ]
    shrunk = saved | {"max_steps": 5}
    with pytest.raises(ConfigError, match="max_steps is 5 here but 10 in the checkpoint"):
        check_resume_config(saved, shrunk, force=False, checkpoint=Path("c"))
    changed = saved | {"lora": {"r": 4}, "learning_rate": 3e-4}
    with pytest.raises(ConfigError, match=r"learning_rate is 0.0003 .*; lora.r is 4 here but 8"):
        check_resume_config(saved, changed, force=False, checkpoint=Path("c"))
    assert check_resume_config(saved, changed, force=True, checkpoint=Path("c")) == [
        "learning_rate: 0.0001 -> 0.0003",
        "lora.r: 8 -> 4",
    ]


def test_a_forced_learning_rate_takes_effect_where_the_schedule_is():
    from transformers import get_scheduler

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved = (optimizer.state_dict(), scheduler.state_dict())

    optimizer = torch.optim.AdamW([weight], lr=2e-3)  # the resumed run's config asks for twice the rate
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 6 / 10)  # the checkpoint's rate wins...
    set_peak_learning_rate(optimizer, scheduler, 2e-3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 6 / 10)  # ...until it is set
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 5 / 10)


def test_resume_names_an_unfinished_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-4").mkdir(parents=True)
    (run_dir / "checkpoint-4" / CONFIG_FILE).write_text("{}")
    (run_dir / "checkpoint-8").mkdir()  # transformers wrote it, but the run died before it was marked whole
    assert resolve_resume("latest", run_dir) == run_dir / "checkpoint-4"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(str(run_dir / "checkpoint-8"), run_dir)
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        resolve_resume(str(run_dir / "checkpoint-12"), run_dir)
    assert resolve_resume("latest", tmp_path / "fresh") is None
