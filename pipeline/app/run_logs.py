"""What the Runs tab shows of a run, read from the files the stages already write (never from a stage's code).

Where each curve comes from, first found wins for a metric:

1. the artifact itself: a ppo artifact carries `metrics.jsonl` (every step's metrics, evaluations
   included) and `samples.jsonl` (the completions logged during training), so its curves survive the run
   folder;
2. the run folder the manifest names (`meta.run_dir`): TensorBoard's event files, which every stage writes
   there under the pipeline's metric names (`train/loss`, `eval/accuracy`, ...) when `report_to` has
   tensorboard (the default);
3. without TensorBoard events, the run folder's newest checkpoint: transformers' `trainer_state.json`
   (stage 1's log history) or the reward stage's `losses.json` (every step's loss).

A run folder keeps its name across runs (a later run with the same `run_name` writes beside an earlier
one's events), so only event files begun before the artifact was published are read. A run folder that
is gone, or that holds nothing readable, is said so in `Curves.notes`, curve by curve of what is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.store import Artifact, ArtifactStore
from pipeline.tracking import trainer_metric_names

EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)(\.\d+)?\.")
# The families shown first, in this order, when a run has them; any other metric follows by name.
FIRST_FAMILIES = ("loss", "accuracy", "score", "reward", "kl", "length", "win", "judge_win")


@dataclass
class Curves:
    """A run's logged metrics over steps, and what could not be read."""

    points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Metric name (`train/loss`, `eval/win`, ...) -> (step, value), by step."""
    sources: list[str] = field(default_factory=list)
    """Where the points came from, in words."""
    notes: list[str] = field(default_factory=list)
    """What is missing and why (a run folder that is gone, a run logged to no tracker)."""

    def add(self, name: str, step: int, value: float) -> None:
        self.points.setdefault(name, []).append((int(step), float(value)))

    def families(self) -> list[str]:
        """Metric families present (`loss` holds train/loss and eval/loss), the familiar ones first."""
        present = sorted({family(name) for name in self.points})
        return [f for f in FIRST_FAMILIES if f in present] + [f for f in present if f not in FIRST_FAMILIES]

    def family_rows(self, name: str) -> list[dict[str, Any]]:
        """One family's points as rows {step, value, metric}, for a line plot coloured by metric."""
        return [
            {"step": step, "value": value, "metric": metric}
            for metric, points in sorted(self.points.items())
            if family(metric) == name
            for step, value in points
        ]


def family(metric: str) -> str:
    """`train/loss` and `eval/loss` -> `loss`; `eval/<set>/win` -> `win`; a bare name is its own family."""
    return metric.rsplit("/", 1)[-1]


def read_curves(store: ArtifactStore, artifact: Artifact) -> Curves:
    """Every curve of the artifact's run (see the module doc for where each comes from)."""
    curves = Curves()
    folder = store.local_path(artifact)
    history = read_jsonl(folder / "metrics.jsonl")
    for row in history:
        for key, value in row.items():
            if key != "step" and is_number(value):
                curves.add(key if "/" in key else f"train/{key}", row["step"], value)
    if history:
        curves.sources.append("metrics.jsonl in the artifact")
    run_dir = artifact.meta.get("run_dir")
    if not run_dir:
        curves.notes.append("the manifest names no run folder: only the artifact's own logs are shown")
        return finish(curves)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "its TensorBoard and checkpoint logs" if history else "its curves"
        curves.notes.append(f"run folder {run_dir} is gone: {what} cannot be shown")
        return finish(curves)
    before = len(curves.points)
    read_events(curves, event_files(run_dir, parse_created(artifact)))
    if len(curves.points) > before:
        curves.sources.append(f"TensorBoard events in {run_dir}")
    elif not read_checkpoint_logs(curves, run_dir) and not history:
        curves.notes.append(
            f"run folder {run_dir} holds no TensorBoard events (report_to had no tensorboard) and no "
            "checkpoint with a log: nothing to plot"
        )
    return finish(curves)


def finish(curves: Curves) -> Curves:
    for name, points in curves.points.items():
        curves.points[name] = sorted(dict(points).items())  # a step logged twice keeps its last value
    return curves


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_created(artifact: Artifact) -> float | None:
    try:
        return datetime.fromisoformat(artifact.manifest.get("created", "")).timestamp()
    except ValueError:
        return None


def event_files(run_dir: Path, created: float | None) -> list[Path]:
    """The run folder's TensorBoard event files begun before `created`, oldest first."""
    found = []
    for path in run_dir.iterdir():
        match = EVENT_FILE.match(path.name)
        if match and path.is_file() and (created is None or int(match.group(1)) <= created):
            found.append((int(match.group(1)), path.name, path))
    return [path for _, _, path in sorted(found)]


def read_events(curves: Curves, files: Iterable[Path]) -> None:
    """Scalars from TensorBoard event files (a resumed run has one per session: later ones win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    known = set(curves.points)  # the artifact's own logs come first
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag not in known:
                for event in events.Scalars(tag):
                    curves.add(tag, event.step, event.value)


def read_checkpoint_logs(curves: Curves, run_dir: Path) -> bool:
    """Stage 1's trainer_state.json or the reward stage's losses.json from the newest checkpoint."""
    folders = sorted(
        (p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if not folders:
        return False
    newest = folders[-1]
    if (newest / "trainer_state.json").is_file():
        state = json.loads((newest / "trainer_state.json").read_text(encoding="utf-8"))
        for row in state.get("log_history", []):
            for name, value in trainer_metric_names(row).items():
                if name not in ("train/step", "train/epoch"):
                    curves.add(name, row["step"], value)
        curves.sources.append(f"trainer_state.json in {newest}")
        return True
    if (newest / "losses.json").is_file():
        losses = json.loads((newest / "losses.json").read_text(encoding="utf-8"))
        for step, loss in enumerate(losses, 1):
            curves.add("train/loss", step, loss)
        curves.sources.append(f"losses.json in {newest}")
        return True
    return False


def read_samples(store: ArtifactStore, artifact: Artifact) -> dict[int, list[dict]]:
    """A ppo artifact's logged completions by step (empty for other stages)."""
    by_step: dict[int, list[dict]] = {}
    for row in read_jsonl(store.local_path(artifact) / "samples.jsonl"):
        by_step.setdefault(int(row["step"]), []).append(row)
    return dict(sorted(by_step.items()))
