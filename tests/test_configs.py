"""Every preset in configs/ loads into its stage's config with strict keys: a typo there fails here."""

from __future__ import annotations

import importlib

import pytest
from conftest import REPO

from pipeline.cli import STAGE_MODULES
from pipeline.config import ConfigError, build, load_config, parse_overrides
from pipeline.job import load_job

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_loads(path, monkeypatch):
    stage = path.name.split("-")[0]
    if stage == "pipeline":  # a job: every stage it names builds its config (paths are the repository's)
        monkeypatch.chdir(REPO)
        job, stages = load_job(str(path), [], list(STAGE_MODULES))
        assert job.store and stages
        for name, values in stages.items():
            assert build(importlib.import_module(STAGE_MODULES[name]).Config, values, path.name)
        return
    assert stage in STAGE_MODULES, f"{path.name}: presets are named <stage>-<purpose>.yaml or pipeline-*.yaml"
    module = importlib.import_module(STAGE_MODULES[stage])
    cfg = load_config(module.Config, path)
    assert cfg.store


def test_overrides_apply_types_and_nesting():
    from stages.sft.train import Config

    cfg = load_config(
        Config,
        None,
        [
            "--data",
            "x.jsonl",
            "--learning_rate",
            "1e-3",
            "--lora.r=4",
            "--padding-free",
            "false",
            "--max_steps",
            "7",
        ],
    )
    assert cfg.learning_rate == 1e-3 and cfg.lora.r == 4 and cfg.padding_free is False and cfg.max_steps == 7


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learnin_rate": 1.0}, "did you mean 'learning_rate'"),
        ({"lora": {"rank": 4}}, "unknown key 'lora.rank'"),
        ({"max_steps": "many"}, "max_steps must be int"),
        ({"eval_fraction": 1.5}, "eval_fraction must be in [0, 1)"),
        ({"lora": 3}, "lora must be a mapping"),
    ],
)
def test_bad_values_name_the_key(values, message):
    from stages.sft.train import Config

    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        build(Config, {"data": "x.jsonl"} | values, "test.yaml")


def test_override_syntax_errors():
    assert parse_overrides(["--a", "1", "--b=2", "--flag"]) == [("a", "1"), ("b", "2"), ("flag", "true")]
    with pytest.raises(ConfigError, match="expected an override like --key value"):
        parse_overrides(["lr", "1"])


def test_the_hh_reward_recipe_reads_the_shared_data_it_names(monkeypatch):
    """configs/reward-hh.yaml reads ../shared/data: enough pairs there for its steps and its held-out limit."""
    from pathlib import Path

    from pipeline.datasets import load_records
    from stages.reward.train import Config

    monkeypatch.chdir(REPO)
    cfg = load_config(Config, REPO / "configs" / "reward-hh.yaml")
    missing = [source for source in (cfg.data, cfg.eval_data) if not Path(source).is_file()]
    if missing:
        pytest.skip(f"the recipe reads {missing[0]}: put the project's shared data beside the repository")
    train = load_records(cfg.data, "comparison", format=cfg.data_format, skip_invalid=cfg.skip_invalid)
    held_out = load_records(
        cfg.eval_data, "comparison", format=cfg.data_format, skip_invalid=cfg.skip_invalid
    )
    assert len(train.records) >= cfg.max_steps * cfg.groups_per_batch
    assert len(held_out.records) >= cfg.eval_limit


def test_the_quality_ppo_recipe_evaluates_on_all_160_benchmark_first_turns(monkeypatch):
    """configs/ppo-quality.yaml trains on one public prompt set and is judged on two others, every prompt."""
    from pathlib import Path

    from pipeline.datasets import load_records
    from stages.ppo.config import Config

    monkeypatch.chdir(REPO)
    cfg = load_config(Config, REPO / "configs" / "ppo-quality.yaml")
    sources = [cfg.prompts, *cfg.eval_prompts.values()]
    missing = [source for source in sources if not Path(source).is_file()]
    if missing:
        pytest.skip(f"the recipe reads {missing[0]}: put the project's shared data beside the repository")
    train = load_records(cfg.prompts, "prompt")
    held_out = {name: load_records(source, "prompt") for name, source in cfg.eval_prompts.items()}
    assert len(train.records) == 175, "Self-Instruct seed tasks"
    assert {name: len(result.records) for name, result in held_out.items()} == {"mt-bench": 80, "vicuna": 80}
    assert cfg.eval_limit is None and cfg.eval_samples >= 2
    assert (cfg.eval_max_new_tokens or cfg.max_new_tokens) >= 128
    train_texts = {record["prompt"][-1]["content"] for record in train.records}
    for name, result in held_out.items():
        overlap = train_texts & {record["prompt"][0]["content"] for record in result.records}
        assert not overlap, f"{name} prompts also in the training prompts: {sorted(overlap)[:2]}"
