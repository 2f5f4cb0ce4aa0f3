"""`report_to`: the names every stage accepts, and the same metrics under the same names in every tracker.

The SFT and reward runs of the shared chain log to TensorBoard and trackio at once; both are read back
here (TensorBoard's event files, trackio's SQLite store) and compared with each other and the manifest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.config import ConfigError, load_config
from pipeline.tracking import flat_config, log_samples, make_trackers, tracker_names


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value over every event file directly in the run folder."""
    out: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return out


def trackio_scalars(project: str) -> dict[str, dict[int, float]]:
    from trackio.sqlite_storage import SQLiteStorage

    (run,) = SQLiteStorage.get_runs(project)
    out: dict[str, dict[int, float]] = {}
    for row in SQLiteStorage.get_logs(project, run):
        for key, value in row.items():
            if key not in ("step", "timestamp") and isinstance(value, (int, float)):
                out.setdefault(key, {})[row["step"]] = value
    return out


def test_report_to_takes_a_name_a_list_or_none_and_refuses_what_cannot_run():
    assert tracker_names("tensorboard") == ["tensorboard"]
    assert tracker_names("tensorboard, trackio") == ["tensorboard", "trackio"]
    assert tracker_names(["TrackIO"]) == ["trackio"]
    assert tracker_names("none") == [] and tracker_names([]) == []
    with pytest.raises(
        ConfigError, match=r"unknown tracker 'tensorbored'; use aim, .*tensorboard.*, or none"
    ):
        tracker_names("tensorbored")
    with pytest.raises(ConfigError, match="report_to: comet_ml is not installed; pip install comet_ml"):
        tracker_names(["tensorboard", "comet_ml"])
    from stages.reward.train import Config as RewardConfig
    from stages.sft.train import Config as SFTConfig

    for config in (SFTConfig, RewardConfig):
        data = ["--data", "data.jsonl"]
        assert load_config(config, None, [*data, "--report_to", "[tensorboard, trackio]"]).report_to == [
            "tensorboard",
            "trackio",
        ]
        with pytest.raises(ConfigError, match="unknown tracker 'nope'"):
            load_config(config, None, [*data, "--report_to", "nope"])


@pytest.mark.parametrize(
    ("stage", "names", "final", "per_step"),
    [
        ("sft", {"train/loss", "train/learning_rate", "eval/loss"}, {"eval/loss": "eval_loss"}, "train/loss"),
        (
            "reward",
            {"train/loss", "train/learning_rate", "eval/loss", "eval/accuracy"},
            {"eval/accuracy": "eval_accuracy", "eval/loss": "eval_loss"},
            "train/loss",
        ),
        (
            "ppo",
            {
                "train/score",
                "train/kl",
                "train/policy_loss",
                "train/no_stop",
                "eval/score",
                "eval/win",
                "eval/kl",
            },
            {"eval/score": "eval_score_final", "eval/win": "eval_win_rate_final"},
            "train/score",
        ),
    ],
)
def test_tensorboard_and_trackio_get_the_same_metrics_under_the_same_names(
    artifact_chain, stage, names, final, per_step
):
    artifact = getattr(artifact_chain, stage)
    run_dir = Path(artifact.meta["run_dir"])
    # The run folder is <output_dir>/<run_name>: sft, reward, ppo-tiny-test.
    assert run_dir.parent == artifact_chain.runs.resolve() and run_dir.name.split("-")[0] == stage
    board = tensorboard_scalars(run_dir)
    tracked = trackio_scalars(run_dir.name)
    assert names <= set(board), sorted(board)
    for name in names:
        assert board[name].keys() == tracked[name].keys(), name
        for step, value in board[name].items():  # TensorBoard keeps float32
            assert tracked[name][step] == pytest.approx(value, rel=1e-6, abs=1e-7), f"{name} at step {step}"
    for name, metric in final.items():  # the last logged value is the one the manifest records
        last = board[name][max(board[name])]
        assert last == pytest.approx(artifact.metrics[metric], rel=1e-6), name
    assert len(board[per_step]) >= 2  # logged during training, not only at the end


def test_samples_are_logged_as_text_where_the_tracker_shows_text(tmp_path):
    from trackio.sqlite_storage import SQLiteStorage

    run_dir = tmp_path / "ppo-samples"
    trackers = make_trackers(["tensorboard", "trackio"], run_dir)
    for tracker in trackers:
        tracker.start()
        tracker.store_init_configuration(flat_config({"lora": {"r": 8, "target_modules": ["q"]}, "x": None}))
    rows = [
        {
            "step": 3,
            "prompt": [{"role": "user", "content": "why | do cats purr"}],
            "response": "To say\nhello.",
            "score": 0.5,
        }
    ]
    log_samples(trackers, rows, step=3)
    for tracker in trackers:
        tracker.finish()

    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    (event,) = accumulator.Tensors("samples/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 3 and "| step | prompt | response | score |" in text
    assert "user: why \\| do cats purr" in text and "To say hello." in text
    logs = SQLiteStorage.get_logs(run_dir.name, SQLiteStorage.get_runs(run_dir.name)[0])
    (table,) = [row["samples"] for row in logs if "samples" in row]
    assert table["_value"] == [
        {"step": 3, "prompt": "user: why | do cats purr", "response": "To say hello.", "score": 0.5}
    ]
