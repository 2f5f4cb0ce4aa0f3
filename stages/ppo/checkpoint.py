"""Resumable PPO runs: everything a run needs to continue bit for bit, written atomically.

A run folder (<output_dir>/<run_name>) holds `checkpoint-<step>` folders:

    policy.safetensors    the policy's trainable tensors (the LoRA adapter, or every weight)
    critic.safetensors    the value model's trainable tensors (adapter + score head, or every weight)
    optimizers.pt         both optimizers' and both learning-rate schedules' state dicts
    state.json            step, data positions, KL controller, rollout engine, metric history, samples
    rng-<rank>.pt         per process: python, numpy, torch (CPU and CUDA) and the sampling generator

Frozen weights (the SFT trunk under a LoRA adapter, the reward model) are not copied: the run reloads
them from the same artifacts. A checkpoint is built under `.tmp-checkpoint-<step>` and renamed into
place only when complete, so a run killed mid-save leaves the previous checkpoint as the latest. A run
stopped by its health check saves the same files as `inspect-<step>`, which `--resume latest` ignores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

PREFIX = "checkpoint-"
STAGING = ".tmp-"
INSPECT = "inspect-"


@dataclass
class RunState:
    """Where a run is, beyond its weights and random state: saved as state.json."""

    step: int = 0
    prompt_position: list[int] = field(default_factory=lambda: [0, 0])
    """[epoch, offset] in the seeded shuffle of the prompts (train.take)."""
    ptx_position: list[int] = field(default_factory=lambda: [0, 0])
    """The same for the PPO-ptx demonstrations."""
    kl_controller: dict[str, Any] = field(default_factory=dict)
    engine: str = ""
    """The rollout engine that sampled the run: a resume under another would not continue it exactly."""
    history: list[dict[str, float]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Trained:
    """A model being trained, as Accelerate prepared it, with its optimizer and learning-rate schedule."""

    name: str
    """Names its files in a checkpoint: <name>.safetensors."""
    module: nn.Module
    optimizer: Any
    schedule: Any

    def step(self, accelerator: Accelerator, max_grad_norm: float) -> None:
        """Clip the accumulated gradient, take an optimizer and a schedule step, clear the gradient."""
        accelerator.clip_grad_norm_(self.module.parameters(), max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [
        p
        for p in run_dir.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`latest` -> the newest checkpoint in the run folder (None when there is none yet); a path -> itself."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no state.json there)")
    return path


def set_aside_earlier_run(run_dir: Path) -> Path | None:
    """Before a fresh start: move a run folder that holds checkpoints to `<run_name>-<UTC time>`, whole.

    The new run's checkpoints would otherwise mix with the earlier run's (and collide at the same step),
    and `--resume latest` after a crash could continue the wrong run. Returns where it went, or None.
    """
    if not checkpoints(run_dir):
        return None
    aside = run_dir.with_name(f"{run_dir.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}")
    os.rename(run_dir, aside)
    return aside


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changes; frozen weights come back from their artifacts."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


def save_checkpoint(
    run_dir: Path,
    accelerator: Accelerator,
    *,
    trained: list[Trained],
    state: RunState,
    generator: torch.Generator,
    keep: int,
) -> Path:
    """Write checkpoint-<step> atomically (every process takes part); keep the newest `keep`."""
    final = write_state(
        run_dir / f"{PREFIX}{state.step:06d}", accelerator, trained=trained, state=state, generator=generator
    )
    if accelerator.is_main_process:
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_for_inspection(
    run_dir: Path,
    accelerator: Accelerator,
    *,
    trained: list[Trained],
    state: RunState,
    generator: torch.Generator,
) -> Path:
    """The state of a run its health check stopped, as inspect-<step> (never picked by --resume latest)."""
    return write_state(
        run_dir / f"{INSPECT}{state.step:06d}", accelerator, trained=trained, state=state, generator=generator
    )


def write_state(
    final: Path,
    accelerator: Accelerator,
    *,
    trained: list[Trained],
    state: RunState,
    generator: torch.Generator,
) -> Path:
    """Weights, optimizers, run state and random state into `final`, built aside and renamed into place."""
    staging = final.with_name(f"{STAGING}{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(generator), staging / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        for part in trained:
            save_file(
                trainable_state(accelerator.unwrap_model(part.module)),
                str(staging / f"{part.name}.safetensors"),
            )
        optimizers = {
            part.name: {"optimizer": part.optimizer.state_dict(), "schedule": part.schedule.state_dict()}
            for part in trained
        }
        torch.save(optimizers, staging / "optimizers.pt")
        (staging / "state.json").write_text(json.dumps(dataclasses.asdict(state)), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sync_folder(staging)
        shutil.rmtree(final, ignore_errors=True)  # an earlier inspection of the same step
        os.rename(staging, final)
    accelerator.wait_for_everyone()
    return final


def sync_folder(folder: Path) -> None:
    """Flush every file to disk before the rename publishes the folder (a power cut, not only a kill)."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def load_checkpoint(
    path: Path, accelerator: Accelerator, *, trained: list[Trained], generator: torch.Generator
) -> RunState:
    """Restore weights, optimizer and schedule states and this process's RNGs; return the run state."""
    for part in trained:
        tensors = load_file(str(path / f"{part.name}.safetensors"))
        unwrapped = accelerator.unwrap_model(part.module)
        expected = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        if set(tensors) != expected:
            missing = sorted(expected ^ set(tensors))[:3]
            raise ValueError(
                f"{path}: the {part.name} weights do not match this run's model (e.g. {missing}): the checkpoint "
                "was written with other model settings (lora, policy_layers, critic_layers, critic, value_init)"
            )
        with torch.no_grad():
            params = dict(unwrapped.named_parameters())
            for key, tensor in tensors.items():
                params[key].copy_(tensor)
    saved = torch.load(path / "optimizers.pt", map_location=accelerator.device, weights_only=False)
    for part in trained:
        part.optimizer.load_state_dict(saved[part.name]["optimizer"])
        part.schedule.load_state_dict(saved[part.name]["schedule"])
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{path} was written by fewer processes; resume with the same number of processes")
    restore_rng(torch.load(rng_file, weights_only=False), generator)
    return RunState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
