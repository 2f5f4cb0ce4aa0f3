"""Our PPO against TRL 1.9.0's `trl.experimental.ppo.PPOTrainer` (the last TRL with PPO), on CPU.

Same policy, reward model, prompts (tokenized once, by us), batch size, mini-batch size, response length,
PPO epochs, learning rate, KL coefficient and LoRA adapter on the policy; each side runs in its own
process (TRL in its own venv, .bench/trl19-venv, built here on first use with the same torch,
transformers, peft, accelerate and datasets versions as ours). Each side reports episodes/s over its
training loop (model loading excluded) and its peak RSS; the trained policies are then evaluated here
with one sampler and one scorer: each held-out prompt's mean standardised reward over `--eval-samples`
samples, fixed seed, before and after, and the mean per-prompt gain with its standard error. Each side
keeps its own defaults where the two differ by design: TRL trains a full-weight value model (a copy of
the reward model) in the policy's optimizer; ours trains a LoRA adapter + head on the reward model's
trunk, which it shares with the frozen reward model.

    .venv/bin/python bench/ppo_vs_trl.py [--steps 4] [--batch 8] [--response-length 32] [--epochs 2]
        [--ours NAME[:KEY=VALUE,...] ...]     # e.g. --ours fast:policy_layers=15,critic_layers=8 default

`--ours` runs our side once per variant, each with its stages.ppo Config overrides (default: one run,
`default`, with none); TRL runs once.

Models: `--policy` (default sft:latest when the store has one, else the embedded SmolLM2-135M-Instruct)
and `--reward` (default reward:latest, else the embedded model's trunk with a seeded random score head,
a fixed if arbitrary reward for both sides to climb). The last line is `speedup: <ours over TRL>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / ".bench" / "trl19-venv"
TRL_VERSION = "1.9.0"
SHARED_PACKAGES = [
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "numpy",
]


# -- set-up (our venv) -----------------------------------------------------------------------------


def ensure_trl_venv() -> Path:
    """A venv with TRL 1.9.0 and exactly our versions of everything both sides share."""
    import importlib.metadata as metadata

    python = TRL_VENV / "bin" / "python"
    probe = "import importlib.metadata as m; print(m.version('trl'))"
    if (
        python.exists()
        and subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip()
        == TRL_VERSION
    ):
        return python
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pins = [f"{name}=={metadata.version(name).split('+')[0]}" for name in SHARED_PACKAGES]
    subprocess.run([python, "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}", *pins], check=True)
    return python


def prepare(args, work: Path) -> dict:
    """Policy and reward model folders, prompt ids and the shared settings, written under `work`."""
    import torch

    sys.path.insert(0, str(REPO))
    from pipeline.chat import prompt_ids
    from pipeline.datasets import load_records
    from pipeline.models import (
        EMBEDDED_MODEL,
        load_causal_lm,
        load_reward_model,
        load_tokenizer,
        match_vocab,
        resolve_model,
        write_card,
    )
    from pipeline.store import ArtifactStore, StoreError

    store = ArtifactStore(args.store)

    def pick(ref: str | None, stage: str) -> str | None:
        if ref:
            return ref
        try:
            return store.resolve(f"{stage}:latest").id
        except StoreError:
            return None

    policy_ref = pick(args.policy, "sft") or EMBEDDED_MODEL
    reward_ref = pick(args.reward, "reward")
    resolved = resolve_model(policy_ref, store)
    tokenizer = load_tokenizer(resolved.path)
    policy = load_causal_lm(resolved, store)
    match_vocab(policy, tokenizer)
    policy.save_pretrained(work / "policy")
    tokenizer.save_pretrained(work / "policy")

    if reward_ref is None:
        reward = load_reward_model(resolve_model(EMBEDDED_MODEL, store), store)
        torch.manual_seed(0)
        with torch.no_grad():
            reward.score.weight.normal_().div_(reward.score.weight.norm())
        mean, std = 0.0, 1.0
    else:
        rm_source = resolve_model(reward_ref, store)
        reward = load_reward_model(rm_source, store)
        mean, std = rm_source.card.get("reward_mean", 0.0), rm_source.card.get("reward_std", 1.0)
    # Bake the standardisation into the head (TRL uses raw scores): both sides then climb (r - mean) / std.
    # The head has no bias, so the mean stays in: a constant shift that advantage whitening removes.
    with torch.no_grad():
        reward.score.weight.div_(std)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(work / "reward")
    tokenizer.save_pretrained(work / "reward")
    write_card(work / "reward", {"kind": "reward", "reward_mean": 0.0, "reward_std": 1.0})
    write_card(work / "policy", {"kind": "causal_lm"})

    prompts = load_records(REPO / "data/demo/prompts.jsonl", "prompt").records
    evals = load_records(REPO / "data/demo/eval_prompts.jsonl", "prompt").records[: args.eval_prompts]
    setup = {
        "policy_ref": policy_ref,
        "reward_ref": reward_ref or "embedded trunk + seeded random head",
        "reward_mean_removed": mean if reward_ref else 0.0,
        "train_ids": [prompt_ids(tokenizer, r["prompt"])[-args.max_prompt_length :] for r in prompts],
        "eval_ids": [prompt_ids(tokenizer, r["prompt"])[-args.max_prompt_length :] for r in evals],
        "steps": args.steps, "batch": args.batch, "mini_batch": args.mini_batch, "epochs": args.epochs,
        "response_length": args.response_length, "learning_rate": args.learning_rate, "kl_coef": args.kl_coef,
        "lora_r": args.lora_r, "seed": args.seed, "threads": args.threads, "eval_samples": args.eval_samples,
        "max_prompt_length": args.max_prompt_length,
        "variants": dict(parse_variant(spec) for spec in args.ours),
    }  # fmt: skip
    (work / "setup.json").write_text(json.dumps(setup))
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return setup


# -- one side each, in its own process -------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_ours(work: Path, variant: str) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from pipeline.config import load_config
    from pipeline.store import ArtifactStore
    from stages.ppo.train import Config, run

    s = json.loads((work / "setup.json").read_text())
    torch.set_num_threads(s["threads"])
    settings = s["variants"][variant]
    overrides = {
        "policy": str(work / "policy"), "reward": str(work / "reward"), "prompts": str(work / "prompts.jsonl"),
        "eval_prompts": None, "store": str(work / "store"), "output_dir": str(work / "runs"), "run_name": f"ours-{variant}",
        "steps": s["steps"], "batch_size": s["batch"], "mini_batch_size": s["mini_batch"], "ppo_epochs": s["epochs"],
        "max_new_tokens": s["response_length"], "max_prompt_length": s["max_prompt_length"],
        "learning_rate": s["learning_rate"], "value_learning_rate": s["learning_rate"], "kl_coef": s["kl_coef"],
        "lora.r": s["lora_r"],
        "lora.alpha": 2 * s["lora_r"], "seed": s["seed"], "report_to": "none", "progress": False,
        "sample_every": 0, "checkpoint_every": 0, "reward_clip": 1e6, **settings,
    }  # fmt: skip
    cfg = load_config(Config, None, [f"--{k}={json.dumps(v)}" for k, v in overrides.items()])
    artifact = run(cfg, ArtifactStore(cfg.store))
    history = [json.loads(line) for line in (Path(artifact.uri) / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(h["step_s"] for h in history)
    return {
        "episodes": s["steps"] * s["batch"], "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
        "policy": artifact.uri, "train_scores": [h["score"] for h in history],
    }  # fmt: skip


def side_trl(work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = json.loads((work / "setup.json").read_text())
    torch.set_num_threads(s["threads"])
    tokenizer = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(
        work / "reward", num_labels=1, dtype=torch.float32
    )
    reward = AutoModelForSequenceClassification.from_pretrained(
        work / "reward", num_labels=1, dtype=torch.float32
    )
    config = PPOConfig(
        output_dir=str(work / "trl-out"), per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
        num_mini_batches=s["batch"] // s["mini_batch"], num_ppo_epochs=s["epochs"],
        total_episodes=s["steps"] * s["batch"], response_length=s["response_length"], temperature=1.0,
        learning_rate=s["learning_rate"], kl_coef=s["kl_coef"], local_rollout_forward_batch_size=s["batch"],
        stop_token="eos", num_sample_generations=0, report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, fp16=False, seed=s["seed"], logging_steps=1, lr_scheduler_type="constant",
    )  # fmt: skip
    peft_config = LoraConfig(
        r=s["lora_r"],
        lora_alpha=2 * s["lora_r"],
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    train = Dataset.from_dict({"input_ids": s["train_ids"]})
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
        train_dataset=train, value_model=value, eval_dataset=Dataset.from_dict({"input_ids": s["eval_ids"]}),
        peft_config=peft_config,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.policy.save_pretrained(work / "trl-policy")
    scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    return {
        "episodes": s["steps"] * s["batch"], "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
        "policy": str(work / "trl-policy"), "train_scores": scores,
    }  # fmt: skip


# -- evaluation (our venv) -------------------------------------------------------------------------


def prompt_scores(work: Path, setup: dict, adapter: Path | None) -> list[float]:
    """Each held-out prompt's mean standardised reward over `eval_samples` samples (fixed seed)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sys.path.insert(0, str(REPO))
    from pipeline.chat import stop_token_ids
    from pipeline.generation import SamplingSettings, make_engine
    from pipeline.models import load_tokenizer
    from pipeline.scoring import RewardScorer

    tokenizer = load_tokenizer(str(work / "policy"))
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    if adapter is not None:
        policy = PeftModel.from_pretrained(policy, adapter)
    rm = AutoModelForSequenceClassification.from_pretrained(
        work / "reward", num_labels=1, dtype=torch.float32
    )
    scorer = RewardScorer(rm).eval()
    prompts = setup["eval_ids"]
    totals = [0.0] * len(prompts)
    generator = torch.Generator().manual_seed(1234)
    # Both sides' policies are sampled the same way: the hf engine (any architecture, our sampler).
    engine = make_engine("hf", policy, stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    engine.sync(policy)
    settings = SamplingSettings(max_new_tokens=setup["response_length"], temperature=1.0)
    with torch.no_grad():
        for _ in range(setup["eval_samples"]):
            for start in range(0, len(prompts), 16):
                seq = engine.sample(prompts[start : start + 16], settings, generator)
                for i, score in enumerate(scorer(seq.input_ids, seq.attention_mask).tolist()):
                    totals[start + i] += score
    return [total / setup["eval_samples"] for total in totals]


def paired_gain(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean per-prompt reward gain and its standard error."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    return statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def parse_variant(spec: str) -> tuple[str, dict]:
    """`NAME` or `NAME:KEY=VALUE,KEY=VALUE` (values as JSON) -> (name, our Config overrides)."""
    name, _, pairs = spec.partition(":")
    settings = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        settings[key] = json.loads(value)
    return name, settings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mini-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt")
    parser.add_argument(
        "--ours", nargs="+", default=["default"], metavar="NAME[:KEY=VALUE,...]",
        help="our runs: a name and stages.ppo Config overrides, e.g. fast:critic_layers=8,policy_layers=15; "
        "the last line reports the first",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--policy", help="model source for the policy (default: sft:latest, else the embedded model)"
    )
    parser.add_argument("--reward", help="reward artifact (default: reward:latest, else a random-head RM)")
    parser.add_argument("--store", default=os.environ.get("RLHF_STORE", str(REPO / "artifacts")))
    parser.add_argument("--work", default=str(REPO / ".bench" / "ppo-vs-trl"))
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)

    if args.side:  # a child process: run one side, print its result as JSON on the last line
        result = side_ours(work, args.variant) if args.side == "ours" else side_trl(work)
        print(json.dumps(result), flush=True)
        return

    import torch

    torch.set_num_threads(args.threads)
    trl_python = ensure_trl_venv()
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    setup = prepare(args, work)
    print(f"policy {setup['policy_ref']}; reward {setup['reward_ref']}; {args.steps} steps x {args.batch} episodes, "
          f"mini-batch {args.mini_batch}, {args.epochs} PPO epochs, {args.response_length} new tokens, "
          f"LoRA r={args.lora_r}, {args.threads} threads", flush=True)  # fmt: skip
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
    }
    results = {}
    sides = [(f"ours-{v}", sys.executable, ["--side", "ours", "--variant", v]) for v in setup["variants"]]
    for side, python, flags in [*sides, ("trl", trl_python, ["--side", "trl"])]:
        done = subprocess.run(
            [str(python), __file__, *flags, "--work", str(work)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
        )
        if done.returncode != 0:
            sys.exit(f"{side} failed:\n{done.stderr[-4000:]}")
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{side}: {results[side]['episodes'] / results[side]['seconds']:.3f} episodes/s, "
              f"peak RSS {results[side]['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip

    before = prompt_scores(work, setup, None)
    for side in results:
        after = prompt_scores(work, setup, Path(results[side]["policy"]))
        results[side]["reward_after"] = statistics.mean(after)
        results[side]["gain"], results[side]["gain_se"] = paired_gain(before, after)
    print(f"\n{'':14} {'episodes/s':>11} {'peak RSS MB':>12} {'eval reward before':>19} {'after':>8} "
          f"{'gain':>8} {'+-se':>6}")  # fmt: skip
    for side, r in results.items():
        print(f"{side:14} {r['episodes'] / r['seconds']:>11.3f} {r['peak_rss_mb']:>12.0f} "
              f"{statistics.mean(before):>19.3f} {r['reward_after']:>8.3f} {r['gain']:>+8.3f} {r['gain_se']:>6.3f}")  # fmt: skip
    trl = results["trl"]
    speedups = {}
    for variant in setup["variants"]:
        ours = results[f"ours-{variant}"]
        speedups[variant] = (ours["episodes"] / ours["seconds"]) / (trl["episodes"] / trl["seconds"])
        print(f"{variant}: speedup {speedups[variant]:.2f}, memory ours/TRL "
              f"{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}, reward gain ours {ours['gain']:+.3f} "
              f"vs TRL {trl['gain']:+.3f} (standard errors {ours['gain_se']:.3f}, {trl['gain_se']:.3f})")  # fmt: skip
    print(f"speedup: {speedups[next(iter(setup['variants']))]:.2f}")


if __name__ == "__main__":
    main()
