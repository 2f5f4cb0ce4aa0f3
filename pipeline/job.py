"""`rlhf run`: SFT, reward model and PPO as one job over one artifact store, resumable at every point.

A job file names each stage's config, as a file or inline, and may set the store and the run folders:

    store: artifacts                    # --store ROOT overrides it
    output_dir: runs                    # every stage's run folders go here
    sft: configs/sft-demo.yaml          # a stage config file ...
    reward: {data: data/demo/comparisons.jsonl, max_steps: 50}    # ... or its keys inline
    ppo: configs/ppo-demo.yaml

Stages run in the order sft, reward, ppo (those the file names). A later stage's `<stage>:latest` reference to
an earlier stage of the job means the artifact this job produced or reused, not whatever is newest in the store.
`--sft.max_steps 10` sets a key of one stage.

Each stage's fingerprint is a hash of its resolved config without the settings that only observe a run
(pipeline.checkpoints.OBSERVING), the artifact ids it names and the content of the files it names. The stage
publishes with the fingerprint in the manifest's meta; a stage whose fingerprint is already in the store is
skipped and named. A stage runs in the run folder `<run_name>-<fingerprint>` with `resume: latest`, so a job
killed inside a stage continues from that stage's last checkpoint when it is started again, and a changed
config starts a fresh run folder instead of refusing to resume.

Stages are imported by module name (pipeline knows no stage). Under `accelerate launch` every process runs the
job; the main process publishes, and the others find its artifact by fingerprint after a barrier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.checkpoints import run_altering
from pipeline.config import ConfigError, build, parse_overrides, set_dotted, to_dict
from pipeline.processes import process_state
from pipeline.store import Artifact, ArtifactStore, default_store_root, file_sha256

FINGERPRINT = "job_fingerprint"
HEADLINE_METRICS = 4
"""Metrics shown per stage: the first numeric ones of its manifest (stages list their headline metrics first)."""


@dataclass
class JobConfig:
    """A job file's keys; each stage is a config file path or a mapping of its keys, or absent."""

    store: str = field(default_factory=default_store_root)
    """Artifact store root for every stage: a folder or an fsspec URL."""
    output_dir: str | None = None
    """Parent of every stage's run folder; unset: each stage's own output_dir."""
    sft: str | dict[str, Any] | None = None
    """Stage 1: a config file, or its keys inline."""
    reward: str | dict[str, Any] | None = None
    """Stage 2: a config file, or its keys inline."""
    ppo: str | dict[str, Any] | None = None
    """Stage 3: a config file, or its keys inline."""


@dataclass
class StageResult:
    """One row of the job's closing table."""

    stage: str
    artifact: Artifact
    status: str
    """ran, resumed or skipped."""
    seconds: float


class JobStore(ArtifactStore):
    """The job's store: an artifact of `stage` published through it carries the stage's fingerprint."""

    def __init__(self, root: str, *, stage: str, fingerprint: str):
        super().__init__(root)
        self.stage, self.fingerprint = stage, fingerprint

    def publish(self, stage: str, payload_dir, *, meta: dict[str, Any] | None = None, **kwargs) -> Artifact:
        if stage == self.stage:
            meta = (meta or {}) | {FINGERPRINT: self.fingerprint}
        return super().publish(stage, payload_dir, meta=meta, **kwargs)


def run_job(path: str, overrides: list[str], stage_modules: dict[str, str]) -> list[StageResult]:
    """Run (or skip, or resume) each stage the job file names; print and return the closing table."""
    job, stage_values = load_job(path, overrides, list(stage_modules))
    store = ArtifactStore(job.store)
    produced: dict[str, Artifact] = {}
    results = []
    for stage, module_name in stage_modules.items():
        if stage not in stage_values:
            continue
        module = importlib.import_module(module_name)
        values = stage_values[stage] | {"store": job.store}
        if job.output_dir is not None:
            values["output_dir"] = job.output_dir
        values = {key: pin_reference(value, store, produced) for key, value in values.items()}
        cfg = build(module.Config, values, f"{path} ({stage})")
        results.append(run_stage(stage, module, cfg, store))
        produced[stage] = results[-1].artifact
    if process_state().is_main_process:
        print(render_table(results))
        print(
            f"\nopen the app on the result (chat with each stage's model, pit them in the arena):\n"
            f"  rlhf label users add admin --role admin --store {job.store}   # once: the app asks for a login\n"
            f"  rlhf app --store {job.store}",
            flush=True,
        )
    return results


def load_job(path: str, overrides: list[str], stages: list[str]) -> tuple[JobConfig, dict[str, dict]]:
    """The job's own settings, and each named stage's config values with its `--stage.key` overrides."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping with store, output_dir and the stages {stages}")
    per_stage: dict[str, dict[str, Any]] = {}
    for key, raw in parse_overrides(overrides):
        stage, _, rest = key.partition(".")
        if stage in stages and rest:
            set_dotted(per_stage.setdefault(stage, {}), rest, yaml.safe_load(raw) if raw != "" else "")
        else:
            set_dotted(loaded, key, yaml.safe_load(raw) if raw != "" else "")
    job = build(JobConfig, loaded, path)
    if not any(loaded.get(stage) for stage in stages):
        raise ConfigError(f"{path}: names no stage; give at least one of {', '.join(stages)}")
    values = {}
    for stage in stages:
        source = loaded.get(stage)
        if source is None:
            if stage in per_stage:
                raise ConfigError(
                    f"--{stage}.* overrides a stage that {path} does not run; add {stage}: to it"
                )
            continue
        values[stage] = stage_file(source, stage) if isinstance(source, str) else dict(source)
        for key, value in flatten_overrides(per_stage.get(stage, {})):
            set_dotted(values[stage], key, value)
    return job, values


def stage_file(path: str, stage: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{stage}: config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return loaded or {}


def flatten_overrides(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += flatten_overrides(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def pin_reference(value: Any, store: ArtifactStore, produced: dict[str, Artifact]) -> Any:
    """`<stage>:latest` -> the id of the artifact this job produced for that stage, else the newest in the store,
    so the fingerprint names the exact input and the stage reads the artifact that was fingerprinted."""
    if not isinstance(value, str) or not value.endswith(":latest"):
        return value
    stage = value[: -len(":latest")]
    return produced[stage].id if stage in produced else store.resolve(value).id


def fingerprint(stage: str, config: dict[str, Any]) -> str:
    """A hash of the settings that decide what a stage computes, and of the content of every file they name."""
    settings = run_altering(config)
    files = {
        key: file_sha256(Path(value))
        for key, value in settings.items()
        if isinstance(value, str) and Path(value).is_file()
    }
    text = json.dumps({"stage": stage, "settings": settings, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def find(store: ArtifactStore, stage: str, digest: str) -> Artifact | None:
    matches = [a for a in store.list(stage) if a.meta.get(FINGERPRINT) == digest]
    return matches[-1] if matches else None


def run_stage(stage: str, module, cfg, store: ArtifactStore) -> StageResult:
    state = process_state()
    digest = fingerprint(stage, to_dict(cfg))
    started = time.perf_counter()
    existing = find(store, stage, digest)
    if existing is not None:
        if state.is_main_process:
            print(f"== {stage}: skipped, {existing.id} was built from the same config and inputs", flush=True)
        return StageResult(stage, existing, "skipped", 0.0)
    cfg = dataclasses.replace(cfg, run_name=f"{cfg.run_name}-{digest[:8]}", resume=cfg.resume or "latest")
    run_dir = Path(cfg.output_dir) / cfg.run_name
    resumed = run_dir.is_dir() and any(p.name.startswith("checkpoint-") for p in run_dir.iterdir())
    if state.is_main_process:
        print(f"== {stage}: {'resuming' if resumed else 'running'} in {run_dir}", flush=True)
    module.run(cfg, JobStore(store.root, stage=stage, fingerprint=digest))
    # Wait until the main process has published, so that every process finds the artifact. A stage may end the
    # process group itself (PPO's run does, after the barrier that follows its publish): nothing left to wait for.
    if not state.use_distributed or torch.distributed.is_initialized():
        state.wait_for_everyone()
    artifact = find(store, stage, digest)
    if artifact is None:
        raise ConfigError(f"the {stage} stage finished without publishing an artifact; see its output above")
    return StageResult(stage, artifact, "resumed" if resumed else "ran", time.perf_counter() - started)


def render_table(results: list[StageResult]) -> str:
    rows = [("stage", "artifact", "status", "time", "headline metrics")]
    for result in results:
        numeric = [(k, v) for k, v in result.artifact.metrics.items() if isinstance(v, (int, float))]
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in numeric[:HEADLINE_METRICS])
        rows.append((result.stage, result.artifact.id, result.status, duration(result.seconds), metrics))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) for row in rows
    ]
    return "\n" + "\n".join(f"{line}  {row[4]}" for line, row in zip(lines, rows, strict=True))


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"
