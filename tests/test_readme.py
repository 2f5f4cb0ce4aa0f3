"""Every command line in the README works as written.

Commands that train (a stage, `rlhf run`) are checked as far as they go before training: their config file and
every `--key value` on the line build the stage's config (an unknown or renamed key, a bad value or a missing
data file fails here); configs/pipeline-tiny-test.yaml itself runs end to end in test_job.py. The commands that
only read (artifacts ls and show, data inspect, reward score) run, against a store of tiny artifacts and with
the embedded model's name standing for a tiny model. The rest (they ask for passwords, serve the app, write or
delete folders: tests/test_label_*.py, test_export.py and test_cleanup.py run them) must parse, with `--help`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO
from ppo_helpers import REWARD_MEAN, REWARD_STD, build_liking_reward_model

from pipeline.cli import STAGE_MODULES, main
from pipeline.config import build, load_config
from pipeline.job import load_job
from pipeline.models import EMBEDDED_MODEL, write_card
from pipeline.store import ArtifactStore

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, a busy machine: see conftest

DATA_KEYS = ("data", "eval_data", "normalise_on", "prompts", "eval_prompts")
READ_ONLY = (["artifacts", "ls"], ["artifacts", "show"], ["data", "inspect"], ["reward", "score"])


def readme_commands() -> list[list[str]]:
    """The `rlhf ...` lines of the README's bash blocks (continuations joined; `accelerate launch ... -m
    pipeline.cli X` counts as `rlhf X`), without `rlhf`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^]]*\]", "", line)  # [--optional arguments] written out in usage style
            words = shlex.split(line, comments=True)
            if "pipeline.cli" in words:
                words = ["rlhf", *words[words.index("pipeline.cli") + 1 :]]
            if words[:1] == ["rlhf"]:
                commands.append(words[1:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_every_kind():
    kinds = {argv[0] for argv in COMMANDS}
    assert {"sft", "reward", "ppo", "run", "data", "artifacts"} <= kinds, kinds


@pytest.fixture(scope="module")
def readme_store(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> ArtifactStore:
    """An sft and a reward artifact, tiny, for the commands that read the store."""
    root = tmp_path_factory.mktemp("readme")
    store = ArtifactStore(root / "store")
    store.publish("sft", tiny_model_dir, config={})
    reward = build_liking_reward_model(tiny_tokenizer, root / "reward")
    write_card(
        reward, {"kind": "reward", "reward_mean": REWARD_MEAN, "reward_std": REWARD_STD, "max_length": 256}
    )
    store.publish("reward", reward, config={})
    return store


def is_data_file(value) -> bool:
    """A data setting that names a file (not unset, nor an artifact such as `labels:latest`)."""
    return isinstance(value, str) and not value.endswith(":latest")


def check_stage_command(argv: list[str]) -> None:
    stage, rest = argv[0], argv[1:]
    config = rest[rest.index("--config") + 1]
    overrides = rest[: rest.index("--config")] + rest[rest.index("--config") + 2 :]
    cfg = load_config(importlib.import_module(STAGE_MODULES[stage]).Config, REPO / config, overrides)
    values = dataclasses.asdict(cfg)
    for key in DATA_KEYS:
        if is_data_file(values.get(key)):
            assert Path(values[key]).is_file(), f"{key}: {values[key]}"


def check_job_command(argv: list[str]) -> None:
    rest = argv[1:]
    path = rest[rest.index("--config") + 1]
    overrides = rest[: rest.index("--config")] + rest[rest.index("--config") + 2 :]
    _, stages = load_job(path, overrides, list(STAGE_MODULES))
    for stage, values in stages.items():
        cfg = build(importlib.import_module(STAGE_MODULES[stage]).Config, values, path)
        for key in DATA_KEYS:
            value = dataclasses.asdict(cfg).get(key)
            assert not is_data_file(value) or Path(value).is_file(), f"{stage}.{key}: {value}"


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(argv) for argv in COMMANDS])
def test_readme_command_works_as_written(argv, readme_store, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    if argv[0] in STAGE_MODULES and argv[1:2] != ["score"]:
        check_stage_command(argv)
    elif argv[0] == "run":
        check_job_command(argv)
    elif argv[:2] in READ_ONLY:
        argv = [str(tiny_model_dir) if word == EMBEDDED_MODEL else word for word in argv]
        code = main([*argv, "--store", str(readme_store.root)])
        assert code == 0, capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as done:
            main([*argv, "--help"])
        assert done.value.code == 0, capsys.readouterr().err
