"""The Runs tab's reading of what the stages logged: curves from a tiny run, and a run folder that is gone."""

from __future__ import annotations

import shutil

import pytest

from pipeline.app.run_logs import read_curves, read_samples


def test_curves_come_from_each_stages_logs(artifact_chain):
    chain = artifact_chain
    sft = read_curves(chain.store, chain.sft)
    assert sft.sources == [f"TensorBoard events in {chain.runs / 'sft'}"] and not sft.notes
    # The chain's SFT run logs every 2 of its 4 steps; its held-out loss before and after training.
    assert [step for step, _ in sft.points["train/loss"]] == [2, 4]
    assert "loss" in sft.families()[:1] and {"train/loss", "eval/loss"} <= set(sft.points)
    reward = read_curves(chain.store, chain.reward)
    assert [step for step, _ in reward.points["eval/accuracy"]] == [2, 4]
    assert reward.points["eval/accuracy"][-1][1] == pytest.approx(
        chain.reward.metrics["eval_accuracy"], abs=1e-6
    )
    ppo = read_curves(chain.store, chain.ppo)
    assert ppo.sources[0] == "metrics.jsonl in the artifact"
    assert [step for step, _ in ppo.points["train/score"]] == [1, 2]
    assert ppo.points["train/score"][-1][1] == pytest.approx(chain.ppo.metrics["train_score_final"], abs=1e-5)
    assert {"score", "kl", "length", "win"} <= set(ppo.families())
    rows = ppo.family_rows("kl")
    assert {row["metric"] for row in rows} == {"train/kl", "eval/kl"} and all(
        set(r) == {"step", "value", "metric"} for r in rows
    )


def test_a_ppo_runs_samples_are_read_per_step(artifact_chain):
    samples = read_samples(artifact_chain.store, artifact_chain.ppo)
    assert list(samples) == [1, 2]  # the chain logs samples at every step
    assert all(
        row["step"] == step and row["response"] is not None for step, rows in samples.items() for row in rows
    )
    assert read_samples(artifact_chain.store, artifact_chain.sft) == {}


def test_a_run_folder_that_is_gone_is_said_so(artifact_chain, store, tmp_path, tiny_model_dir):
    run_dir = shutil.copytree(artifact_chain.runs / "sft", tmp_path / "runs" / "sft")
    artifact = store.publish("sft", tiny_model_dir, config={}, meta={"run_dir": str(run_dir)})
    assert read_curves(store, artifact).points["train/loss"]
    shutil.rmtree(run_dir)
    gone = read_curves(store, artifact)
    assert gone.points == {} and gone.notes == [f"run folder {run_dir} is gone: its curves cannot be shown"]


def test_without_tensorboard_the_newest_checkpoints_log_is_read(
    artifact_chain, store, tmp_path, tiny_model_dir
):
    run_dir = shutil.copytree(artifact_chain.runs / "sft", tmp_path / "runs" / "sft")
    for events in run_dir.glob("events.out.tfevents.*"):
        events.unlink()
    artifact = store.publish("sft", tiny_model_dir, config={}, meta={"run_dir": str(run_dir)})
    curves = read_curves(store, artifact)
    assert curves.sources == [f"trainer_state.json in {run_dir / 'checkpoint-4'}"]
    assert [step for step, _ in curves.points["train/loss"]] == [2, 4]
    for folder in run_dir.glob("checkpoint-*"):
        shutil.rmtree(folder)
    nothing = read_curves(store, artifact)
    assert nothing.points == {} and "holds no TensorBoard events" in nothing.notes[0]


def test_the_runs_tab_shows_an_artifacts_lineage_curves_and_samples(tmp_path, artifact_chain):
    from app_helpers import PASSWORDS, label_db, served
    from gradio_client import Client

    from pipeline.app.session import AppSettings

    chain = artifact_chain
    with served(AppSettings(db=label_db(tmp_path), store=chain.store)) as url:
        alice = Client(url, auth=("alice", PASSWORDS["alice"]), verbose=False, download_files=False)
        details, notes, families, *rest = alice.predict(chain.ppo.id, api_name="/runs_show")
        plots, samples = rest[:6], rest[-1]
        assert details.startswith(f"id:            {chain.ppo.id}") and chain.sft.id in details
        assert notes.startswith("Curves from metrics.jsonl in the artifact")
        assert plots[0] is not None and len(samples["data"]) == len(read_samples(chain.store, chain.ppo)[2])
