"""Stage 3: PPO against the reward model, with a per-token KL penalty to the SFT policy (InstructGPT).

Each step takes a batch of prompts (each process its shard), samples responses from the policy, scores
them (reference log-probs, values, the reward model at the last token), turns that into KL-shaped
per-token rewards and GAE advantages, then runs `ppo_epochs` passes of clipped policy and value updates
over mini-batches. The maths is in rl.py, sampling and scoring in rollout.py, the models and how they
share trunks in models.py, evaluation in evaluate.py, resume in checkpoint.py; this file wires them
together, logs, and publishes a `ppo` artifact: policy, value model, metrics and samples.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler, set_seed

from pipeline.chat import prompt_ids, stop_token_ids, tokenize_conversation
from pipeline.config import to_dict
from pipeline.datasets import load_records
from pipeline.models import LoraSettings, load_tokenizer, resolve_model, write_card
from pipeline.store import Artifact, ArtifactStore, dataset_fingerprint, default_store_root
from stages.ppo import rl
from stages.ppo.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, set_aside_earlier_run
from stages.ppo.evaluate import EvalSettings, evaluate
from stages.ppo.models import Loaded, Models, build_models
from stages.ppo.rollout import (
    Lower,
    Sequences,
    generation_weights,
    left_pad,
    lower_layers,
    position_ids,
    response_logits,
    response_logprobs,
    response_slice,
    response_values,
    sample,
)


@dataclass
class Config:
    """Stage 3 settings; any key can be set in the YAML file or as `--key value`."""

    store: str = field(default_factory=default_store_root)
    """Artifact store root: a folder or an fsspec URL (s3://bucket/prefix)."""
    policy: str = "sft:latest"
    """The SFT model: the starting policy and the frozen KL reference."""
    reward: str = "reward:latest"
    """The reward model artifact (scores at the last token; its card gives reward_mean/reward_std)."""
    prompts: str = "data/demo/prompts.jsonl"
    """Prompts to roll out on (any source pipeline.datasets reads as prompt records)."""
    eval_prompts: str | None = "data/demo/eval_prompts.jsonl"
    """Held-out prompts for evaluation (reward, KL, length, win rate over SFT); null disables it."""
    data_format: str = "auto"
    """Format of `prompts` and `eval_prompts`: auto, canonical, hh-rlhf, ..."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters on the policy and the value model; `enabled: false` trains every weight."""
    value_init: Literal["reward", "policy"] = "reward"
    """Value model trunk and head: the reward model's (InstructGPT) or the policy's with a zero head."""
    critic: Literal["trunk", "head"] = "trunk"
    """Value model: a trained trunk + head (`lora` applies), or a trained head on the frozen reward model's
    hidden states (no forward or backward pass of its own: steps about twice as fast, a less flexible V)."""
    critic_layers: int = 0
    """With critic: trunk, value_init: reward and LoRA: adapt only the reward model's top critic_layers
    layers; those below stay the reward model's and run once per rollout for the score, the values and
    every update. 0 adapts every layer."""
    policy_layers: int = 0
    """With LoRA: adapt only the policy's top policy_layers layers; those below stay the SFT model's and
    run once per rollout for the reference log-probs and every update. 0 adapts every layer."""
    steps: int = 100
    """PPO steps (rollout + update) to run."""
    batch_size: int = 16
    """Rollouts per step, all processes together (each process samples batch_size / processes)."""
    mini_batch_size: int = 8
    """Rollouts per optimizer step, all processes together."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    max_prompt_length: int = 256
    """Prompts longer than this keep their last tokens (the assistant header stays)."""
    max_new_tokens: int = 64
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature; log-probs use logits / temperature at rollout and update time."""
    learning_rate: float = 1e-5
    """Policy learning rate (LoRA wants ~1e-4, full fine-tuning ~1e-6 to 1e-5)."""
    value_learning_rate: float = 1e-5
    """Value model learning rate."""
    lr_scheduler: str = "constant"
    """transformers scheduler name for both models: constant, linear, cosine, ..."""
    warmup_steps: int = 0
    """Optimizer steps of learning-rate warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip per model per optimizer step."""
    kl_coef: float = 0.05
    """beta: per-token KL penalty coefficient (the start value when kl_target is set)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 = log p - log q, k3 = (q/p - 1) - log(q/p)."""
    kl_target: float | None = None
    """Adaptive KL controller target (summed KL per response); null keeps beta fixed."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon in episodes (Ziegler et al.)."""
    reward_clip: float = 5.0
    """Standardised reward-model scores are clipped to +-reward_clip."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that never emits a stop token; null: no penalty."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    value_clip_range: float = 0.2
    """Value clip: new values stay within this of the rollout's values in the loss."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean and unit variance over the (per-process) batch."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (entropy is logged either way)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the SFT language-modelling loss on demonstrations; 0 disables it."""
    ptx_data: str = "data/demo/sft.jsonl"
    """Demonstrations for the ptx loss (conversations; assistant tokens are the targets)."""
    ptx_batch_size: int = 4
    """Demonstrations per process per optimizer step for the ptx loss."""
    ptx_max_length: int = 512
    """Demonstrations are cut to this many tokens."""
    eval_every: int = 20
    """Evaluate every this many steps (and before the first and after the last); 0: only before and after."""
    eval_limit: int | None = 64
    """Evaluate on at most this many held-out prompts."""
    eval_batch_size: int = 16
    """Prompts per process per evaluation generation batch."""
    eval_temperature: float | None = None
    """Evaluation sampling temperature (fixed seed); null uses `temperature`, 0 is greedy."""
    sample_every: int = 10
    """Log `num_samples` completions as text every this many steps; 0 disables it."""
    num_samples: int = 2
    """Completions logged each time."""
    checkpoint_every: int = 25
    """Save a resumable checkpoint every this many steps; 0 disables checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run folder (older ones are deleted)."""
    output_dir: str = "runs"
    """Parent of the run folder (checkpoints, TensorBoard events)."""
    run_name: str = "ppo"
    """Run folder name under output_dir; `--resume latest` looks there."""
    resume: str | None = None
    """`latest` (newest checkpoint of this run, or a fresh start when none) or a checkpoint folder."""
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    """Where step metrics go besides the artifact's metrics.jsonl."""
    progress: bool = True
    """Show a progress bar with the live score and KL (main process)."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "mini_batch_size",
            "ppo_epochs",
            "max_new_tokens",
            "max_prompt_length",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive for PPO sampling, got {self.temperature}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"kl_target must be positive, got {self.kl_target}")
        if not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ValueError("lam must be in [0, 1] and gamma in (0, 1]")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be at least 1")
        for name in ("critic_layers", "policy_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (every layer) or more, got {getattr(self, name)}")
        if self.critic == "head" and self.value_init != "reward":
            raise ValueError(
                "critic: head reads the reward model's hidden states, so it needs value_init: reward"
            )


# -- data ------------------------------------------------------------------------------------------


def load_prompts(
    source: str, tokenizer, cfg: Config, limit: int | None = None
) -> tuple[list[dict], list[list[int]]]:
    """Prompt records and their ids, cut to the last max_prompt_length tokens (the assistant header stays)."""
    records = load_records(source, "prompt", format=cfg.data_format, limit=limit).records
    return records, [prompt_ids(tokenizer, r["prompt"])[-cfg.max_prompt_length :] for r in records]


def take(total: int, count: int, position: list[int], seed: int) -> list[int]:
    """The next `count` indices of a seeded per-epoch shuffle of range(total); advances position [epoch, offset].

    The position is two integers, so a checkpoint stores where the data stream is without storing it.
    """
    out: list[int] = []
    while len(out) < count:
        epoch, offset = position
        order = torch.randperm(
            total, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        ).tolist()
        grab = order[offset : offset + count - len(out)]
        out += grab
        position[:] = [epoch + 1, 0] if offset + len(grab) >= total else [epoch, offset + len(grab)]
    return out


def load_demonstrations(cfg: Config, tokenizer) -> list[tuple[list[int], list[int]]]:
    """PPO-ptx demonstrations as (ids, assistant mask); those with no assistant token left are dropped."""
    records = load_records(cfg.ptx_data, "conversation").records
    tokenized = [tokenize_conversation(tokenizer, r["messages"], cfg.ptx_max_length) for r in records]
    return [(t.input_ids, t.assistant_mask) for t in tokenized if any(t.assistant_mask)]


def ptx_loss(policy: nn.Module, rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> Tensor:
    """Mean next-token cross-entropy on the assistant tokens of right-padded demonstrations."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, trained) in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        labels[i, : len(row)] = torch.tensor([t if m else -100 for t, m in zip(row, trained, strict=True)])
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = policy(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
    ).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


# -- rollouts --------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One process's rollouts with everything the update needs; [B, R] unless noted."""

    seq: Sequences
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor
    """[B] standardised, clipped, penalised reward-model scores."""
    kl: Tensor
    """k1 per token: the KL that is logged and that the adaptive controller steers."""
    advantages: Tensor
    returns: Tensor
    features: Tensor | None = None
    """[B, R, H] the reward trunk's hidden states the value head reads (critic: head), else None."""
    critic_lower: Lower | None = None
    """The layers the critic shares with the reward model (critic_layers), else None."""
    policy_lower: Lower | None = None
    """The layers the policy shares with the reference (policy_layers), else None."""

    def select(self, index: Tensor) -> Experience:
        """Rows `index`, without the columns that are padding in every selected row."""
        seq = self.seq.select(index)
        first = int(seq.query_mask.any(0).long().argmax())
        width = max(int(seq.response_mask.sum(-1).max()), 1)
        seq = Sequences(
            seq.query[:, first:], seq.query_mask[:, first:], seq.response[:, :width],
            seq.response_mask[:, :width], seq.ended, seq.logprobs[:, :width],
        )  # fmt: skip
        cut = [t[index][:, :width] for t in (self.ref_logprobs, self.values)]
        rest = [t[index][:, :width] for t in (self.kl, self.advantages, self.returns)]
        features = None if self.features is None else self.features[index][:, :width]
        columns = slice(first, self.seq.query.shape[1] + width)
        lowers = [
            None if lower is None else lower.select(index, columns)
            for lower in (self.critic_lower, self.policy_lower)
        ]
        return Experience(seq, *cut, self.scores[index], *rest, features, *lowers)


@torch.no_grad()
def collect(models: Models, seq: Sequences, cfg: Config, beta: float) -> Experience:
    """Reference log-probs, values, scores, then KL-shaped rewards and (whitened) GAE advantages."""
    policy_lower = None
    if models.policy_shared_layers:  # one pass through the shared layers for the reference and the updates
        policy_lower = lower_layers(
            models.policy_model, models.policy_shared_layers, seq.input_ids, seq.attention_mask
        )
    with models.as_reference() as reference:
        ref_logprobs = response_logprobs(reference, seq, cfg.temperature, policy_lower)
    features = critic_lower = None
    if models.critic_reads_reward:  # one reward-trunk pass gives both the score and the value features
        hidden = models.reward.hidden(seq.input_ids, seq.attention_mask)
        scores = models.score(seq, cfg.reward_clip, cfg.missing_eos_penalty, hidden=hidden)
        features = response_slice(hidden, seq)
        values = models.critic_model(features)
    else:
        if models.critic_shared_layers:  # one pass through the shared layers for the values and the score
            critic_lower = models.critic_model.lower(seq.input_ids, seq.attention_mask)
        values = response_values(models.critic_model, seq, critic_lower)
        scores = models.score(seq, cfg.reward_clip, cfg.missing_eos_penalty, lower=critic_lower)
    mask = seq.response_mask
    values = values * mask
    penalty = rl.kl_estimate(seq.logprobs, ref_logprobs, cfg.kl_estimator) * mask
    rewards = rl.shaped_rewards(scores, penalty, mask, beta)
    advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)
    kl = rl.kl_k1(seq.logprobs, ref_logprobs) * mask
    return Experience(
        seq, ref_logprobs, values, scores, kl, advantages, returns, features, critic_lower, policy_lower
    )


# -- training --------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """A run's models, optimizers and random state; `step()` is one PPO iteration."""

    cfg: Config
    acc: Accelerator
    models: Models
    optimizers: dict[str, Any]
    """policy_opt, critic_opt, policy_sched, critic_sched (the checkpoint saves them by these names)."""
    generator: torch.Generator
    """Draws every sampled token and mini-batch order; saved in checkpoints."""
    kl: rl.KLController
    prompts: list[list[int]]
    stop_ids: list[int]
    pad_id: int
    demonstrations: list[tuple[list[int], list[int]]] = field(default_factory=list)

    def rollout(self, state: dict[str, Any]) -> tuple[Experience, list[int]]:
        cfg, acc = self.cfg, self.acc
        batch = take(len(self.prompts), cfg.batch_size, state["prompt_position"], cfg.seed)
        mine = batch[acc.process_index :: acc.num_processes]
        query, query_mask = left_pad([self.prompts[i] for i in mine], self.pad_id, acc.device)
        policy = self.models.policy_model
        with generation_weights(policy) as decoder:
            seq = sample(
                decoder, query, query_mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                stop_ids=self.stop_ids, pad_id=self.pad_id, generator=self.generator,
            )  # fmt: skip
        return collect(self.models, seq, cfg, self.kl.beta), mine

    def step(self, state: dict[str, Any]) -> tuple[dict[str, float], Experience, list[int]]:
        """Roll out, update, move the KL coefficient; the step's metrics averaged over processes."""
        tick = time.perf_counter()
        exp, mine = self.rollout(state)
        rollout_s = time.perf_counter() - tick
        metrics = self.update(exp, state["ptx_position"])
        seq = exp.seq
        score, kl, length, ended = self.acc.reduce(
            torch.stack([exp.scores.mean(), exp.kl.sum(-1).mean(), seq.response_mask.sum(-1).mean(), seq.ended.float().mean()]),
            "mean",
        ).tolist()  # fmt: skip
        metrics.update(score=score, kl=kl, reward=score - self.kl.beta * kl, beta=self.kl.beta, length=length)
        metrics.update(ended=ended, rollout_s=rollout_s, step_s=time.perf_counter() - tick)
        self.kl.update(kl, self.cfg.batch_size)
        return metrics, exp, mine

    def update(self, exp: Experience, ptx_position: list[int]) -> dict[str, float]:
        cfg, acc, models = self.cfg, self.acc, self.models
        stats: dict[str, list[float]] = defaultdict(list)
        size, mini = exp.scores.shape[0], cfg.mini_batch_size // acc.num_processes
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(size, generator=self.generator).to(exp.scores.device)
            for start in range(0, size, mini):
                part = exp.select(order[start : start + mini])
                mask = part.seq.response_mask
                logits = response_logits(models.policy, part.seq, part.policy_lower)
                logprobs, entropy = rl.logprobs_and_entropy(logits, part.seq.response, cfg.temperature)
                policy = rl.clipped_policy_loss(
                    logprobs, part.seq.logprobs, part.advantages, mask, cfg.clip_range
                )
                if cfg.entropy_coef:  # the bonus needs the entropy's gradient
                    entropy = rl.entropy_from_logits(logits / cfg.temperature)
                entropy = rl.masked_mean(entropy, mask)
                loss = policy.loss - cfg.entropy_coef * entropy
                if cfg.ptx_coef > 0:
                    stats["ptx_loss"].append(self.backward_with_ptx(loss, ptx_position))
                else:
                    acc.backward(loss)
                self.optimizer_step(models.policy, "policy")

                if part.features is None:
                    values = response_values(models.critic, part.seq, part.critic_lower)
                else:
                    values = models.critic(part.features)
                value_loss, value_clip = rl.clipped_value_loss(
                    values, part.values, part.returns, mask, cfg.value_clip_range
                )
                acc.backward(value_loss)
                self.optimizer_step(models.critic, "critic")
                for key, value in (
                    ("policy_loss", policy.loss), ("value_loss", value_loss), ("entropy", entropy),
                    ("approx_kl", policy.approx_kl), ("clip_fraction", policy.clip_fraction),
                    ("value_clip_fraction", value_clip),
                ):  # fmt: skip
                    stats[key].append(value.item())
        return {key: sum(v) / len(v) for key, v in stats.items()}

    def backward_with_ptx(self, ppo_loss: Tensor, position: list[int]) -> float:
        """PPO-ptx: add ptx_coef x the LM loss on demonstrations; one gradient all-reduce for both."""
        cfg, acc = self.cfg, self.acc
        with acc.no_sync(self.models.policy):
            acc.backward(ppo_loss)
        picked = take(len(self.demonstrations), cfg.ptx_batch_size * acc.num_processes, position, cfg.seed)
        rows = [self.demonstrations[i] for i in picked[acc.process_index :: acc.num_processes]]
        lm = ptx_loss(self.models.policy, rows, self.pad_id, acc.device)
        acc.backward(cfg.ptx_coef * lm)
        return lm.item()

    def optimizer_step(self, model: nn.Module, name: str) -> None:
        self.acc.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)
        self.optimizers[f"{name}_opt"].step()
        self.optimizers[f"{name}_sched"].step()
        self.optimizers[f"{name}_opt"].zero_grad(set_to_none=True)


def make_optimizers(cfg: Config, loaded: Loaded) -> dict[str, Any]:
    updates = cfg.steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    out: dict[str, Any] = {}
    for name, model, lr in (
        ("policy", loaded.policy, cfg.learning_rate),
        ("critic", loaded.critic, cfg.value_learning_rate),
    ):
        trained = [p for p in model.parameters() if p.requires_grad]
        out[f"{name}_opt"] = torch.optim.AdamW(trained, lr=lr, weight_decay=cfg.weight_decay)
        # Stepped by us once per optimizer step (Accelerate's wrapper would step it once per process).
        out[f"{name}_sched"] = get_scheduler(
            cfg.lr_scheduler,
            out[f"{name}_opt"],
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=updates,
        )
    return out


def run(cfg: Config, store: ArtifactStore) -> Artifact | None:
    """Train with PPO and publish a `ppo` artifact (main process); other processes return None."""
    acc = Accelerator()
    set_seed(cfg.seed)
    if cfg.batch_size % acc.num_processes or cfg.mini_batch_size % acc.num_processes:
        raise ValueError(
            f"batch_size and mini_batch_size must be multiples of the {acc.num_processes} processes"
        )
    run_dir = Path(cfg.output_dir) / cfg.run_name
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is None and acc.is_main_process:
        aside = set_aside_earlier_run(run_dir)
        if aside is not None:
            print(f"{run_dir} held an earlier run's checkpoints: moved to {aside} "
                  "(--resume latest continues a run instead)", flush=True)  # fmt: skip
    acc.wait_for_everyone()

    tokenizer = load_tokenizer(resolve_model(cfg.policy, store).path)
    loaded = build_models(
        cfg.policy, cfg.reward, store, tokenizer, cfg.lora, cfg.value_init, cfg.critic, acc.device,
        cfg.critic_layers, cfg.policy_layers,
    )  # fmt: skip
    records, prompts = load_prompts(cfg.prompts, tokenizer, cfg)
    eval_prompts = (
        load_prompts(cfg.eval_prompts, tokenizer, cfg, cfg.eval_limit)[1] if cfg.eval_prompts else []
    )
    optimizers = make_optimizers(cfg, loaded)
    policy, critic, optimizers["policy_opt"], optimizers["critic_opt"] = acc.prepare(
        loaded.policy, loaded.critic, optimizers["policy_opt"], optimizers["critic_opt"]
    )
    models = Models(
        policy, critic, acc.unwrap_model(policy), acc.unwrap_model(critic), loaded.reference, loaded.reward,
        loaded.policy_shared_layers,
    )  # fmt: skip
    trainer = Trainer(
        cfg, acc, models, optimizers, torch.Generator(acc.device).manual_seed(cfg.seed * 1000 + acc.process_index),
        rl.KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon), prompts, stop_token_ids(tokenizer),
        tokenizer.pad_token_id, load_demonstrations(cfg, tokenizer) if cfg.ptx_coef > 0 else [],
    )  # fmt: skip
    state: dict[str, Any] = {
        "step": 0,
        "prompt_position": [0, 0],
        "ptx_position": [0, 0],
        "history": [],
        "samples": [],
    }
    trained = {"policy": policy, "critic": critic}
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, acc, models=trained, optimizers=optimizers, generator=trainer.generator
        )
        trainer.kl.load_state_dict(state["kl_controller"])
        if acc.is_main_process:
            print(f"resumed from {resume_from} at step {state['step']}", flush=True)

    how = EvalSettings(
        cfg.max_new_tokens, cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature,
        cfg.eval_batch_size, cfg.seed, cfg.reward_clip, cfg.missing_eos_penalty, trainer.stop_ids, trainer.pad_id,
    )  # fmt: skip
    sft_scores: dict[int, float] = {}
    if state["step"] == 0 and eval_prompts:
        state["history"].append({"step": 0, **evaluate(models, eval_prompts, how, acc, sft_scores)})
    writer = tensorboard(cfg, run_dir, acc)
    bar = tqdm(
        total=cfg.steps, initial=state["step"], desc="ppo", disable=not (acc.is_main_process and cfg.progress)
    )
    started, episodes = time.perf_counter(), 0
    while state["step"] < cfg.steps:
        metrics, exp, mine = trainer.step(state)
        state["step"] = step = state["step"] + 1
        episodes += cfg.batch_size
        if cfg.sample_every and step % cfg.sample_every == 0 and acc.is_main_process:
            state["samples"] += samples(exp, [records[i] for i in mine], tokenizer, step, cfg.num_samples)
        if eval_prompts and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            metrics.update(evaluate(models, eval_prompts, how, acc, sft_scores))
        state["history"].append({"step": step, **metrics})
        log(writer, state["history"][-1], state["samples"])
        bar.update(1)
        bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.3f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            state["kl_controller"] = trainer.kl.state_dict()
            save_checkpoint(
                run_dir, step, acc, models=trained, optimizers=optimizers, state=state,
                generator=trainer.generator, keep=cfg.keep_checkpoints,
            )  # fmt: skip
    bar.close()
    if writer is not None:
        writer.close()
    summary = summarize(state["history"], episodes, time.perf_counter() - started)
    return publish(cfg, store, acc, models, tokenizer, loaded, state, summary)


# -- logging and publishing ------------------------------------------------------------------------


def tensorboard(cfg: Config, run_dir: Path, acc: Accelerator):
    if cfg.report_to != "tensorboard" or not acc.is_main_process:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))


def log(writer, metrics: dict[str, float], logged_samples: list[dict]) -> None:
    if writer is None:
        return
    step = metrics["step"]
    for key, value in metrics.items():
        if key != "step":
            writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
    for item in logged_samples:
        if item["step"] == step:
            prompt = item["prompt"][-1]["content"]
            text = f"**prompt**: {prompt}\n\n**response**: {item['response']}\n\nscore {item['score']:.3f}"
            writer.add_text("samples", text, step)


def samples(exp: Experience, records: list[dict], tokenizer, step: int, count: int) -> list[dict]:
    """The first `count` completions of this process's batch, as text with their score and KL."""
    out = []
    for i in range(min(count, len(records))):
        length = int(exp.seq.response_mask[i].sum())
        response = tokenizer.decode(exp.seq.response[i, :length], skip_special_tokens=True)
        out.append(
            {
                "step": step,
                "prompt": records[i]["prompt"],
                "response": response,
                "score": exp.scores[i].item(),
                "kl": exp.kl[i].sum().item(),
            }
        )
    return out


def summarize(history: list[dict], episodes: int, elapsed: float) -> dict[str, float]:
    """Headline metrics for the manifest: evaluation before and after, the last step, throughput."""
    out: dict[str, float] = {}
    evals = [h for h in history if "eval/score" in h]
    if evals:
        first, last = evals[0], evals[-1]
        out.update(eval_score_initial=first["eval/score"], eval_score_final=last["eval/score"])
        out.update(
            eval_kl_final=last["eval/kl"],
            eval_win_rate_final=last["eval/win"],
            eval_length_final=last["eval/length"],
        )
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


def publish(
    cfg: Config, store: ArtifactStore, acc: Accelerator, models: Models, tokenizer: PreTrainedTokenizerBase,
    loaded: Loaded, state: dict[str, Any], summary: dict[str, float],
) -> Artifact | None:  # fmt: skip
    """Policy (adapter or full weights) + tokenizer at the root, the value model under value/, logs beside.

    The policy loads with pipeline.models.load_causal_lm (SFT + merged adapter); see save_value_model.
    """
    artifact = None
    if acc.is_main_process:

        def source(resolved) -> str:
            return resolved.lineage.get("artifact") or resolved.lineage.get("model")

        value_base = loaded.reward_source if cfg.value_init == "reward" else loaded.sft
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            models.policy_model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            write_card(
                out,
                {"kind": "causal_lm"} | ({"adapter_base": source(loaded.sft)} if cfg.lora.enabled else {}),
            )
            save_value_model(models, cfg, source(value_base), out / "value")
            for name, rows in (("metrics.jsonl", state["history"]), ("samples.jsonl", state["samples"])):
                (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            inputs = [
                loaded.sft.lineage | {"role": "policy"},
                loaded.reward_source.lineage | {"role": "reward"},
            ]
            for path, role in (
                (cfg.prompts, "prompts"),
                (cfg.eval_prompts, "eval_prompts"),
                (cfg.ptx_coef and cfg.ptx_data, "ptx"),
            ):
                if path:
                    inputs.append(
                        (dataset_fingerprint(path) if Path(path).is_file() else {"dataset": path})
                        | {"role": role}
                    )
            meta = {
                "adapter": cfg.lora.enabled,
                "value_init": cfg.value_init,
                "base_policy": source(loaded.sft),
            }
            artifact = store.publish(
                "ppo", out, config=to_dict(cfg), inputs=inputs, metrics=summary, meta=meta
            )
    acc.wait_for_everyone()
    return artifact


def save_value_model(models: Models, cfg: Config, base: str, folder: Path) -> None:
    """A trunk critic loads with pipeline.models.load_reward_model (one-output classifier, adapter merged);
    a head critic is value_head.safetensors over the trunk its card names. Either card gives the units."""
    critic = models.critic_model
    card = {"value_model": True, "reward_mean": critic.mean, "reward_std": critic.std}
    if models.critic_reads_reward:
        folder.mkdir()
        save_file(
            {"weight": critic.score.weight.detach().cpu().contiguous()},
            str(folder / "value_head.safetensors"),
        )
        write_card(folder, card | {"kind": "value_head", "trunk": base})
    else:
        critic.classifier.save_pretrained(folder)
        write_card(folder, card | {"kind": "reward"} | ({"adapter_base": base} if cfg.lora.enabled else {}))
