"""What a PPO run leaves behind: its tracker logs, sample completions, headline metrics and the artifact.

The artifact holds the policy (adapter or full weights) and tokenizer at its root, the value model under
value/, and three logs beside them: metrics.jsonl (every step's metrics, evaluations included),
samples.jsonl (completions logged during training) and eval_pairs.jsonl (the last evaluation's replies
of the policy and of the SFT model to the first prompts of each set, with both reward models' scores).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from pipeline.config import to_dict
from pipeline.data_sources import data_input
from pipeline.model_card import write_model_card
from pipeline.models import resolve_model, write_card
from pipeline.store import Artifact, ArtifactStore
from pipeline.tracking import log_samples, run_folder
from stages.ppo.checkpoint import RunState
from stages.ppo.config import Config
from stages.ppo.critic import Critic, RewardOnly
from stages.ppo.policy import Policy


def log_step(acc: Accelerator, metrics: dict[str, float], logged_samples: list[dict]) -> None:
    """A step's metrics to every tracker (`train/<name>`, evaluations as `eval/...`), and the completions
    logged at this step where the tracker shows text."""
    step = int(metrics["step"])
    acc.log(
        {key if "/" in key else f"train/{key}": value for key, value in metrics.items() if key != "step"},
        step=step,
    )
    if acc.is_main_process:
        rows = [
            {"prompt": item["prompt"][-1]["content"], "response": item["response"], "score": item["score"]}
            for item in logged_samples
            if item["step"] == step
        ]
        log_samples(acc.trackers, rows, step)


def summarize(history: list[dict], episodes: int, elapsed: float) -> dict[str, float]:
    """Headline metrics for the manifest: each evaluation set before and after, the last step, throughput.

    A single unnamed set gives eval_score_final, eval_win_rate_final, ...; a set named N gives
    eval_N_score_final, ...
    """
    out: dict[str, float] = {}
    prefixes = sorted({key.rsplit("/", 1)[0] for row in history for key in row if key.startswith("eval/")})
    for prefix in prefixes:
        tag = prefix.removeprefix("eval").replace("/", "_")
        evals = [h for h in history if f"{prefix}/score" in h]
        first, last = evals[0], evals[-1]
        out[f"eval{tag}_score_initial"] = first[f"{prefix}/score"]
        out[f"eval{tag}_score_final"] = last[f"{prefix}/score"]
        for key, name in (("win", "win_rate"), ("win_ci", "win_rate_ci"), ("judge_win", "judge_win_rate"),
                          ("win_gap", "win_gap"), ("kl", "kl"), ("length", "length"), ("words", "words"),
                          ("no_stop", "no_stop")):  # fmt: skip
            if f"{prefix}/{key}" in last:
                out[f"eval{tag}_{name}_final"] = last[f"{prefix}/{key}"]
    trained = [h for h in history if "score" in h]
    if trained:
        out.update(
            train_score_final=trained[-1]["score"],
            train_kl_final=trained[-1]["kl"],
            beta_final=trained[-1]["beta"],
        )
    out.update(
        steps=len(trained), episodes_this_session=episodes, episodes_per_second=episodes / max(elapsed, 1e-9)
    )
    return {k: round(v, 6) if isinstance(v, float) and math.isfinite(v) else v for k, v in out.items()}


# -- publishing --------------------------------------------------------------------------------------------


def publish(
    cfg: Config,
    store: ArtifactStore,
    acc: Accelerator,
    *,
    policy: Policy,
    critic: Critic | RewardOnly,
    tokenizer: PreTrainedTokenizerBase,
    state: RunState,
    summary: dict[str, float],
    pairs: list[dict],
    run_dir: Path,
) -> Artifact | None:
    """Policy (adapter or full weights) + tokenizer at the root, the value model (if any) under value/, logs
    beside.

    The policy loads with pipeline.models.load_causal_lm (SFT + merged adapter); the value model with
    load_reward_model (a trunk critic) or as value/value_head.safetensors over the reward model.
    """
    artifact = None
    if acc.is_main_process:
        sft, reward = resolve_model(cfg.policy, store), resolve_model(cfg.reward, store)
        value_base = reward if cfg.value_init == "reward" else sft
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            policy.lm.save_pretrained(out)
            tokenizer.save_pretrained(out)
            write_card(
                out, {"kind": "causal_lm"} | ({"adapter_base": source_of(sft)} if cfg.lora.enabled else {})
            )
            if critic.net is not None:  # advantage: rloo trains no value model
                critic.save(out / "value", base=source_of(value_base), adapter=cfg.lora.enabled)
                (out / "value" / "README.md").unlink(
                    missing_ok=True
                )  # peft's empty template; the root card covers it
            logs = (
                ("metrics.jsonl", state.history),
                ("samples.jsonl", state.samples),
                ("eval_pairs.jsonl", pairs),
            )
            for name, rows in logs:
                (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            inputs = [sft.lineage | {"role": "policy"}, reward.lineage | {"role": "reward"}]
            if cfg.eval_judge:
                inputs.append(resolve_model(cfg.eval_judge, store).lineage | {"role": "judge"})
            eval_sources = (
                {"": cfg.eval_prompts} if isinstance(cfg.eval_prompts, str) else cfg.eval_prompts or {}
            )
            datasets = [(cfg.prompts, "prompts"), (cfg.ptx_coef and cfg.ptx_data, "ptx")]
            datasets += [
                (path, f"eval_prompts:{name}" if name else "eval_prompts")
                for name, path in eval_sources.items()
            ]
            for path, role in datasets:
                if path:
                    inputs.append(data_input(path) | {"role": role})
            meta = {
                "adapter": cfg.lora.enabled,
                "value_init": cfg.value_init,
                "value_model": critic.net is not None,
                "base_policy": source_of(sft),
                "rollout_engine": state.engine,
            } | run_folder(run_dir)
            manifest = dict(config=to_dict(cfg), inputs=inputs, metrics=summary, meta=meta)
            write_model_card(out, "ppo", store=store, **manifest)  # README.md: replaces peft's template
            artifact = store.publish("ppo", out, **manifest)
    acc.wait_for_everyone()
    return artifact


def source_of(resolved) -> str:
    """The model source that resolves anywhere: its artifact id, else the path or Hub id it was given as."""
    return resolved.lineage.get("artifact") or resolved.lineage.get("model")
