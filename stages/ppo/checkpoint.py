"""Resumable PPO runs: everything a run needs to continue bit for bit, written atomically.

A run folder (<output_dir>/<run_name>) holds `checkpoint-<step>` folders:

    policy.safetensors    the policy's trainable tensors (the LoRA adapter, or every weight)
    critic.safetensors    the value model's trainable tensors (adapter + score head, or every weight)
    optimizers.pt         both optimizers' and both learning-rate schedulers' state dicts
    state.json            step, data positions, KL controller, metric history, logged samples
    rng-<rank>.pt         per process: python, numpy, torch (CPU and CUDA) and the sampling generator

Frozen weights (the SFT trunk under a LoRA adapter, the reward model) are not copied: the run reloads
them from the same artifacts. A checkpoint is built under `.tmp-checkpoint-<step>` and renamed into
place only when complete, so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
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
    step: int,
    accelerator: Accelerator,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, Any],
    state: dict[str, Any],
    generator: torch.Generator,
    keep: int,
) -> Path:
    """Write checkpoint-<step> atomically (every process takes part); keep the newest `keep`."""
    final = run_dir / f"{PREFIX}{step:06d}"
    staging = run_dir / f"{STAGING}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(generator), staging / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        for name, model in models.items():
            save_file(trainable_state(accelerator.unwrap_model(model)), str(staging / f"{name}.safetensors"))
        torch.save({name: obj.state_dict() for name, obj in optimizers.items()}, staging / "optimizers.pt")
        (staging / "state.json").write_text(json.dumps(state), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sync_folder(staging)
        os.rename(staging, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def sync_folder(folder: Path) -> None:
    """Flush every file to disk before the rename publishes the folder (a power cut, not only a kill)."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def load_checkpoint(
    path: Path,
    accelerator: Accelerator,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, Any],
    generator: torch.Generator,
) -> dict[str, Any]:
    """Restore weights, optimizer and scheduler states and this process's RNGs; return the run state."""
    for name, model in models.items():
        tensors = load_file(str(path / f"{name}.safetensors"))
        unwrapped = accelerator.unwrap_model(model)
        expected = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))[:3]
            raise ValueError(
                f"{path}: {name} weights do not match this run's model (e.g. {missing}); same config?"
            )
        with torch.no_grad():
            params = dict(unwrapped.named_parameters())
            for key, tensor in tensors.items():
                params[key].copy_(tensor)
    saved = torch.load(path / "optimizers.pt", map_location=accelerator.device, weights_only=False)
    for name, obj in optimizers.items():
        obj.load_state_dict(saved[name])
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{path} was written by fewer processes; resume with the same number of processes")
    restore_rng(torch.load(rng_file, weights_only=False), generator)
    return json.loads((path / "state.json").read_text(encoding="utf-8"))
