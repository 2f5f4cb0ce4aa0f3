"""Experiment trackers for every stage: one `report_to` setting, one set of metric names, text samples.

Every stage logs through Accelerate's trackers (tensorboard, wandb, mlflow, trackio, comet_ml, aim,
clearml, dvclive, swanlab), so `report_to` means the same in all three stages, and a metric has the same
name in every tracker: `train/<name>` per training step, `eval/<name>` per held-out evaluation
(`train/loss`, `train/learning_rate`, `eval/loss`, `eval/accuracy`, `eval/score`, ...). transformers' own
integrations rename keys for some trackers and not others (MLflow would get `loss` and `eval_loss`), so
stage 1 sends the Trainer's logs to the same trackers through `TrackerCallback` instead of `report_to`.

A run is named after its run folder, as Accelerate names projects: TensorBoard writes its events in
`<output_dir>/<run name>/`, W&B and trackio use the name as the project, MLflow as the experiment
(`MLFLOW_EXPERIMENT_NAME` overrides it). Each tracker is configured the way its users know: WANDB_MODE,
WANDB_API_KEY, MLFLOW_TRACKING_URI, TRACKIO_DIR, ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, get_available_trackers
from transformers import TrainerCallback

from pipeline.config import ConfigError

NONE = "none"


def run_folder(run_dir: Path) -> dict[str, str]:
    """The manifest's record of a run folder (`meta.run_dir`): where the app finds the run's curves and
    `rlhf artifacts gc` the run's checkpoints. Absolute, since stages run from any directory."""
    return {"run_dir": str(Path(run_dir).resolve())}


def tracker_names(report_to: str | list[str]) -> list[str]:
    """The trackers `report_to` names: one name, a comma-separated string or a list; `none` for none.

    An unknown name or a tracker whose package is missing is a ConfigError that says what to do.
    """
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [name.strip().lower() for name in names if name.strip()]
    if names == [NONE] or not names:
        return []
    known = sorted(LOGGER_TYPE_TO_CLASS)
    installed = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"report_to: unknown tracker {name!r}; use {', '.join(known)}, or none")
        if name not in installed:
            raise ConfigError(
                f"report_to: {name} is not installed; pip install {name}, or drop it from report_to"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"report_to names a tracker twice: {names}")
    return names


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested resolved config as the flat scalar hyperparameters trackers accept (`lora.r`: 16)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_config(value, prefix=f"{name}.")
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:  # None, lists: as text, so every tracker takes them
            flat[name] = str(value)
    return flat


def make_trackers(names: list[str], run_dir: Path) -> list[GeneralTracker]:
    """Accelerate's trackers for a run folder, built as `Accelerator.init_trackers` builds them (not started)."""
    trackers = []
    for name in names:
        tracker_class = LOGGER_TYPE_TO_CLASS[name]
        if tracker_class.requires_logging_directory:
            trackers.append(tracker_class(run_dir.name, str(run_dir.parent)))
        else:
            trackers.append(tracker_class(run_dir.name))
    return trackers


def start_trackers(names: list[str], run_dir: Path, config: dict[str, Any]) -> list[GeneralTracker]:
    """Trackers for a loop whose Accelerator has no `log_with` (stage 1's Trainer), started, config logged."""
    trackers = make_trackers(names, run_dir)
    for tracker in trackers:
        tracker.start()
        tracker.store_init_configuration(flat_config(config))
    return trackers


def finish_trackers(trackers: list[GeneralTracker]) -> None:
    for tracker in trackers:
        tracker.finish()


def trainer_metric_names(logs: dict[str, Any]) -> dict[str, float]:
    """A transformers Trainer log under the pipeline's names: `eval_loss` -> `eval/loss`, `loss` -> `train/loss`.

    The Trainer's end-of-training summary (`train_runtime`, ...) becomes `train/train_runtime`, as
    transformers' own TensorBoard integration names it. Non-numbers are dropped.
    """
    out = {}
    for key, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[len('eval_') :]}" if key.startswith("eval_") else f"train/{key}"] = value
    return out


class TrackerCallback(TrainerCallback):
    """Send a Trainer's logs to Accelerate trackers (main process), under the pipeline's metric names."""

    def __init__(self, trackers: list[GeneralTracker]):
        self.trackers = trackers

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            values = trainer_metric_names(logs)
            for tracker in self.trackers:
                tracker.log(values, step=state.global_step)


def log_samples(trackers: list[GeneralTracker], rows: list[dict[str, Any]], step: int) -> None:
    """Text samples (dicts of prompt, response, score, ...) where the tracker shows text; main process only.

    TensorBoard gets a markdown table (its Text tab), trackio and W&B a table; the others have no text
    view that Accelerate reaches and get none.
    """
    if not rows:
        return
    columns = list(rows[0])
    data = [[format_cell(row.get(column)) for column in columns] for row in rows]
    for tracker in trackers:
        if tracker.name == "tensorboard":
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
            lines = ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in data]
            tracker.writer.add_text("samples", "\n".join([header, *lines]), step)
            tracker.writer.flush()
        elif tracker.name == "trackio":
            import trackio

            tracker.log({"samples": trackio.Table(columns=columns, data=data)}, step=step)
        elif tracker.name == "wandb":
            tracker.log_table("samples", columns=columns, data=data, step=step)


def format_cell(value: Any) -> str | float | int:
    """Messages as `role: content` lines; numbers as they are; anything else as text without newlines."""
    if isinstance(value, list):
        value = " / ".join(f"{m['role']}: {m['content']}" for m in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return " ".join(str(value).split())
