"""A PPO run that keeps a checkpoint at every step, on the shared artifact chain, for the app's tests.

The chain's own PPO run keeps no checkpoint (checkpoint_every 0); this one runs two steps from the chain's
SFT and reward artifacts with the transformers engine (no kernel to build), keeps both checkpoints, logs
two sample completions per step and publishes a ppo artifact whose weights are its last checkpoint's, in a
copy of the chain's store (the shared chain stays as other tests expect it).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ppo_helpers import write_config

from pipeline.cli import main as cli_main
from pipeline.store import Artifact, ArtifactStore

RUN_NAME = "ppo-checkpointed"


@dataclass
class CheckpointedRun:
    store: ArtifactStore
    ppo: Artifact
    run_dir: Path


def run_with_checkpoints(chain, folder: Path) -> CheckpointedRun:
    store = ArtifactStore(shutil.copytree(chain.store.root, folder / "store"))
    config = write_config(
        folder / "ppo.yaml", store, policy=chain.sft.id, reward=chain.reward.id, steps=2, batch_size=8,
        mini_batch_size=4, ppo_epochs=1, eval_every=0, eval_prompts=None, sample_every=1, num_samples=2,
        checkpoint_every=1, keep_checkpoints=2, rollout_engine="hf", run_name=RUN_NAME,
        output_dir=str(folder / "runs"), report_to="none",
    )  # fmt: skip
    assert cli_main(["ppo", "--config", str(config)]) == 0
    return CheckpointedRun(store, store.resolve("ppo:latest"), folder / "runs" / RUN_NAME)
