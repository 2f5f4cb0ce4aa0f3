"""Resumable PPO runs: what a checkpoint holds beyond pipeline.checkpoints' run folders and RNG state.

A run folder (<output_dir>/<run_name>) holds `checkpoint-<step>` folders (pipeline/checkpoints.py: built
aside, renamed into place when whole, with the run's resolved config, which a resume is checked against):

    policy.safetensors    the policy's trainable tensors (the LoRA adapter, or every weight)
    critic.safetensors    the value model's trainable tensors (adapter + score head, or every weight)
    optimizers.pt         both optimizers' and both learning-rate schedules' state dicts
    state.json            step, data positions, KL controller, rollout engine, metric history, samples
    run_config.json       the run's resolved config (written last: a checkpoint without it is incomplete)
    rng-<rank>.pt         per process: python, numpy, torch (CPU and CUDA) and the sampling generator

Frozen weights (the SFT trunk under a LoRA adapter, the reward model) are not copied: the run reloads
them from the same artifacts. A run stopped by its health check saves the same files as `inspect-<step>`,
which `--resume latest` ignores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

from pipeline.checkpoints import (
    load_rng,
    load_trainable,
    save_checkpoint,
    set_peak_learning_rate,
    trainable_state,
)

INSPECT = "inspect-"


@dataclass
class RunState:
    """Where a run is, beyond its weights and random state: saved as state.json."""

    step: int = 0
    prompt_position: list[int] = field(default_factory=lambda: [0, 0])
    """[epoch, offset] in the seeded shuffle of the prompts (data.take)."""
    ptx_position: list[int] = field(default_factory=lambda: [0, 0])
    """The same for the PPO-ptx demonstrations."""
    kl_controller: dict[str, Any] = field(default_factory=dict)
    engine: str = ""
    """The rollout engine that sampled the run: a resume under another would not continue it exactly."""
    length_fit: dict[str, float] | None = None
    """With length_correction: linear, the fit made before the first step (length.LengthFit), reused on resume."""
    history: list[dict[str, float]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    """The session's resolved config with `policy` as the artifact it resolved to: what a reader outside
    the run (the app's chat with a checkpoint) rebuilds the policy from: SFT model, lora, policy_layers."""


@dataclass
class Trained:
    """A model being trained, as Accelerate prepared it, with its optimizer and learning-rate schedule."""

    name: str
    """Names its files in a checkpoint: <name>.safetensors."""
    module: nn.Module
    optimizer: Any
    schedule: Any
    learning_rate: float
    """This run's peak learning rate: a resume with --force and another one takes it from the checkpoint on."""

    def step(self, accelerator: Accelerator, max_grad_norm: float) -> None:
        """Clip the accumulated gradient, take an optimizer and a schedule step, clear the gradient."""
        accelerator.clip_grad_norm_(self.module.parameters(), max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


def save(
    run_dir: Path, accelerator: Accelerator, *, trained: list[Trained], state: RunState, config: dict[str, Any],
    generator: torch.Generator, keep: int, inspect: bool = False,
) -> Path:  # fmt: skip
    """checkpoint-<step> (or inspect-<step>) with the weights, optimizers and state of every process."""

    def write(folder: Path) -> None:
        for part in trained:
            tensors = trainable_state(accelerator.unwrap_model(part.module))
            save_file(tensors, str(folder / f"{part.name}.safetensors"))
        optimizers = {
            part.name: {"optimizer": part.optimizer.state_dict(), "schedule": part.schedule.state_dict()}
            for part in trained
        }
        torch.save(optimizers, folder / "optimizers.pt")
        (folder / "state.json").write_text(json.dumps(dataclasses.asdict(state)), encoding="utf-8")

    return save_checkpoint(
        run_dir, state.step, accelerator, config=config, write=write, keep=keep, generator=generator,
        prefix=INSPECT if inspect else "checkpoint-",
    )  # fmt: skip


def load(
    path: Path, accelerator: Accelerator, *, trained: list[Trained], generator: torch.Generator
) -> RunState:
    """Restore weights, optimizer and schedule states and this process's RNGs; return the run state."""
    for part in trained:
        load_trainable(accelerator.unwrap_model(part.module), path / f"{part.name}.safetensors")
    saved = torch.load(path / "optimizers.pt", map_location=accelerator.device, weights_only=False)
    for part in trained:
        part.optimizer.load_state_dict(saved[part.name]["optimizer"])
        part.schedule.load_state_dict(saved[part.name]["schedule"])
        set_peak_learning_rate(part.optimizer, part.schedule, part.learning_rate)
    load_rng(path, accelerator.process_index, generator)
    return RunState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
