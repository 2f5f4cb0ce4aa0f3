"""Resumable runs: run folders, complete checkpoints, RNG state, and which settings may change on resume.

A stage's run folder is `<output_dir>/<run_name>`: stable, so that `--resume latest` finds it again. It holds
`checkpoint-<step>` folders; a checkpoint is complete when it holds `run_config.json` (the resolved config of
the run that wrote it), which is written last: a run killed while saving leaves the previous checkpoint as the
latest. A stage with its own loop builds a checkpoint under `.tmp-checkpoint-<step>` and renames it into place
(`save_checkpoint`); a stage on transformers' Trainer lets the Trainer write the folder, then marks it complete
(`mark_complete`).

On resume, `check_resume_config` compares the checkpoint's config with the new one. A changed setting that
would alter the run (a learning rate, the data, LoRA's rank) is refused with the key, both values and the fix;
`force` accepts it. Settings that only extend the run (a longer `steps`, `max_steps` or `epochs`) or only
observe it (the keys in OBSERVING) may change freely.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.config import ConfigError
from pipeline.processes import process_state

PREFIX = "checkpoint-"
STAGING = ".tmp-"
CONFIG_FILE = "run_config.json"

EXTENDING = ("steps", "max_steps", "epochs")
"""How long a run is: may grow on resume (the run continues further), not shrink."""
OBSERVING = (
    "eval_every",
    "logging_every",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "num_samples",
    "progress",
    "report_to",
    "output_dir",
    "run_name",
    "store",
    "resume",
    "force",
    # PPO's held-out evaluation and its health bound: what is measured of the run, not what it trains on.
    "eval_prompts",
    "eval_limit",
    "eval_samples",
    "eval_batch_size",
    "eval_temperature",
    "eval_max_new_tokens",
    "eval_judge",
    "max_kl",
)
"""Cadences, trackers and where things go: they change what is seen of a run, never its weights."""


# -- run folders and checkpoints --------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [
        p
        for p in run_dir.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and p.name[len(PREFIX) :].isdigit()
        and (p / CONFIG_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`latest` -> the newest complete checkpoint in the run folder (None when there is none yet: a fresh
    start); a path -> that checkpoint, which must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / CONFIG_FILE).is_file():
        hint = f"; `--resume latest` picks the newest complete one in {run_dir}"
        if not path.exists():
            raise ConfigError(f"--resume {resume}: no such checkpoint folder{hint}")
        raise ConfigError(
            f"--resume {resume}: not a complete checkpoint (no {CONFIG_FILE}: a save that was killed "
            f"midway, or not a checkpoint at all){hint}"
        )
    return path


def set_aside_earlier_run(run_dir: Path) -> Path | None:
    """Before a fresh start: move a run folder that holds checkpoints to `<run_name>-<UTC time>`, whole.

    The new run's checkpoints would otherwise mix with the earlier run's (and collide at the same step),
    and `--resume latest` after a crash could continue the wrong run. Returns where it went, or None.
    """
    if not run_dir.is_dir() or not any(p.name.startswith((PREFIX, STAGING)) for p in run_dir.iterdir()):
        return None
    aside = run_dir.with_name(f"{run_dir.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}")
    os.rename(run_dir, aside)
    return aside


def remove_incomplete(run_dir: Path) -> None:
    """Delete checkpoint folders a killed save left behind (no CONFIG_FILE), so none is mistaken for a whole one."""
    if not run_dir.is_dir():
        return
    complete = set(checkpoints(run_dir))
    for path in run_dir.iterdir():
        if path.is_dir() and path.name.startswith((PREFIX, STAGING + PREFIX)) and path not in complete:
            shutil.rmtree(path, ignore_errors=True)


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints."""
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomically(path: Path, value: Any) -> None:
    """Write JSON under a temporary name, flush it, then rename: the file is whole or absent."""
    staging = path.with_name(f"{STAGING}{path.name}")
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(staging, path)


def sync_folder(folder: Path) -> None:
    """Flush every file to disk before a rename publishes the folder (a power cut, not only a kill)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def mark_complete(checkpoint: Path, config: dict[str, Any], keep: int) -> None:
    """Make a checkpoint another process wrote (transformers' Trainer) resumable, then drop the oldest ones.

    Call it on the main process after every process has written its part."""
    sync_folder(checkpoint)
    write_json_atomically(checkpoint / CONFIG_FILE, config)
    prune(checkpoint.parent, keep)


def save_checkpoint(
    run_dir: Path,
    step: int,
    accelerator,
    *,
    config: dict[str, Any],
    write: Callable[[Path], None],
    keep: int,
    generator: torch.Generator | None = None,
    prefix: str = PREFIX,
) -> Path:
    """Write <prefix><step> atomically: every process its RNG state (and its sampling `generator`'s), the main
    process `write(folder)` (weights, optimizer, run state) and the config; renamed into place when whole.
    Keeps the newest `keep` checkpoints. Another `prefix` (a run stopped to inspect) is never resumed from."""
    final = run_dir / f"{prefix}{step:06d}"
    staging = run_dir / f"{STAGING}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(generator), staging / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        write(staging)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sync_folder(staging)
        shutil.rmtree(final, ignore_errors=True)  # a later run's, when resuming from an earlier checkpoint
        os.rename(staging, final)
        if prefix == PREFIX:
            prune(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load_rng(checkpoint: Path, process_index: int, generator: torch.Generator | None = None) -> None:
    """Restore this process's RNG state (and its sampling `generator`'s) from a checkpoint save_checkpoint wrote."""
    rng_file = checkpoint / f"rng-{process_index}.pt"
    if not rng_file.is_file():
        raise ConfigError(
            f"{checkpoint} was written by fewer processes than this run has; resume with the same number"
        )
    restore_rng(torch.load(rng_file, weights_only=False), generator)


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": None if generator is None else generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        generator.set_state(state["generator"])


def saved_config(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))


def start_or_resume(run_dir: Path, resume: str | None, config: dict[str, Any], *, force: bool) -> Path | None:
    """The checkpoint to resume from, its config checked against this run's; or None for a fresh start, after
    the main process moved an earlier run's checkpoints out of the run folder. Every process calls it."""
    state = process_state()
    resume_from = resolve_resume(resume, run_dir)
    if resume_from is not None:
        changes = check_resume_config(saved_config(resume_from), config, force=force, checkpoint=resume_from)
        if state.is_main_process:
            remove_incomplete(run_dir)
            changed = f" with changed settings: {'; '.join(changes)}" if changes else ""
            print(f"resumed from {resume_from} at step {checkpoint_step(resume_from)}{changed}", flush=True)
    elif state.is_main_process:
        aside = set_aside_earlier_run(run_dir)
        if aside is not None:
            print(f"{run_dir} held an earlier run's checkpoints: moved to {aside} "
                  "(--resume latest continues a run instead)", flush=True)  # fmt: skip
    state.wait_for_everyone()
    return resume_from


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changes; frozen weights come back from their artifacts."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy a checkpoint's trainable tensors (trainable_state, saved with safetensors) into `model`."""
    tensors = load_file(str(path))
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        differ = sorted(expected ^ set(tensors))[:3]
        raise ConfigError(
            f"{path}: the checkpoint's trained tensors do not fit this run's model (e.g. {differ}); "
            "resume with the checkpoint's model and lora settings"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


# -- what may change on resume ----------------------------------------------------------------------


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}: every setting under the name `--key` overrides use."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and key != "trainer_args":
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_altering(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what a run computes: everything but OBSERVING (a run's fingerprint)."""
    return {k: v for k, v in flatten(config).items() if k not in OBSERVING}


def check_resume_config(
    saved: dict[str, Any], current: dict[str, Any], *, force: bool, checkpoint: Path
) -> list[str]:
    """Refuse a resume whose settings would alter the run; return every change as "key: old -> new".

    Free: OBSERVING keys, and EXTENDING keys that grow. With `force`, any change is accepted (the caller
    prints the list). Raises ConfigError naming each refused key, both values and the fix.
    """
    old, new = flatten(saved), flatten(current)
    changes, refused = [], []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "<unset>"), new.get(key, "<unset>")
        if before == after:
            continue
        changes.append(f"{key}: {before!r} -> {after!r}")
        if key in OBSERVING or (key in EXTENDING and grows(before, after)):
            continue
        refused.append((key, before, after))
    if refused and not force:
        named = "; ".join(
            f"{key} is {after!r} here but {before!r} in the checkpoint" for key, before, after in refused
        )
        backs = " ".join(f"--{key} {before}" for key, before, _ in refused)
        raise ConfigError(
            f"--resume {checkpoint}: {named}, which would alter the run; set it back ({backs}), "
            "or add --force to resume with the new value"
        )
    return changes


def grows(before: Any, after: Any) -> bool:
    """A longer run: a larger count (-1, "run the epochs", is not a count and compares as a change)."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after))
    return numbers and before >= 0 and after > before


def set_peak_learning_rate(optimizer, scheduler, learning_rate: float) -> None:
    """After loading a checkpoint's optimizer and schedule: the peak rate of this config, not the checkpoint's
    (a forced `learning_rate` change takes effect at the schedule's current point)."""
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(scheduler.last_epoch)
