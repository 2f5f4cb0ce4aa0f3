"""Stage 3: PPO against the reward model, with a per-token KL penalty to the SFT policy (InstructGPT).

Each step: take a batch of prompts (each process its shard), sample responses from the policy, score
them (policy and reference log-probs, values, the reward model at the last token), turn that into
KL-shaped per-token rewards and GAE advantages, then run `ppo_epochs` passes of clipped policy and
value updates over mini-batches. The maths is in rl.py, sampling and scoring in rollout.py, resume in
checkpoint.py; this file wires them together, logs, evaluates and publishes a `ppo` artifact.

With LoRA (the default) one trunk serves three roles: the policy (adapter on), the frozen reference
(adapter off, peft's `disable_adapter()`) and generation (adapter merged). The value model, when it
starts from the reward model, likewise shares its trunk with the frozen reward model.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler, set_seed

from pipeline.chat import prompt_ids, stop_token_ids, tokenize_conversation
from pipeline.config import to_dict
from pipeline.datasets import load_records
from pipeline.models import (
    LoraSettings,
    ModelError,
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    match_vocab,
    resolve_model,
    training_dtype,
    write_card,
)
from pipeline.store import Artifact, ArtifactStore, dataset_fingerprint
from stages.ppo import rl
from stages.ppo.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from stages.ppo.rollout import (
    Sequences,
    TokenValues,
    hf_model,
    last_token_scores,
    left_pad,
    merged_lora,
    position_ids,
    response_logits,
    response_logprobs,
    response_values,
    sample,
)


@dataclass
class Config:
    """Stage 3 settings; any key can be set in the YAML file or as `--key value`."""

    store: str = "artifacts"
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


# -- models ----------------------------------------------------------------------------------------


@dataclass
class Models:
    """The trained policy and critic (wrapped for distributed training) and their frozen partners."""

    policy: nn.Module
    critic: nn.Module
    policy_model: nn.Module
    """The unwrapped policy (a peft model with LoRA): generation and no-grad scoring use it."""
    critic_model: TokenValues
    reference: nn.Module | None
    """A frozen SFT copy, or None: the policy with its adapter disabled."""
    reward: TokenValues | None
    """A frozen reward model, or None: the critic with its adapter disabled."""

    @contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy_model.disable_adapter():
                yield self.policy_model

    @contextmanager
    def as_reward(self) -> Iterator[TokenValues]:
        if self.reward is not None:
            yield self.reward
        else:
            with self.critic_model.classifier.disable_adapter():
                yield self.critic_model


def frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def build_models(cfg: Config, store: ArtifactStore, device: torch.device, tokenizer: PreTrainedTokenizerBase):
    """Policy + reference, critic + reward model, and the reward card; trainable parts in train mode."""
    dtype = training_dtype(device)
    sft = resolve_model(cfg.policy, store)
    policy = load_causal_lm(sft, store, dtype)
    match_vocab(policy, tokenizer)
    reference = None if cfg.lora.enabled else frozen(copy.deepcopy(policy))
    policy = apply_lora(policy, cfg.lora)

    rm_source = resolve_model(cfg.reward, store)
    card = rm_source.card
    mean, std = float(card.get("reward_mean", 0.0)), float(card.get("reward_std", 1.0)) or 1.0
    rm = load_reward_model(rm_source, store, dtype)
    rm.config.pad_token_id = tokenizer.pad_token_id
    if cfg.value_init == "reward":
        # InstructGPT: the value model starts as the reward model, in the same standardised units.
        reward = None if cfg.lora.enabled else frozen(TokenValues(copy.deepcopy(rm), mean, std))
        critic = TokenValues(apply_lora(rm, cfg.lora, task_type="SEQ_CLS"), mean, std)
    else:
        reward = frozen(TokenValues(rm, mean, std))
        head = load_reward_model(sft, store, dtype)
        head.config.pad_token_id = tokenizer.pad_token_id
        nn.init.zeros_(hf_model(head).score.weight)  # V = 0 everywhere until the value loss says otherwise
        critic = TokenValues(apply_lora(head, cfg.lora, task_type="SEQ_CLS"))
    for model in (policy, critic, reference, reward):
        if model is not None:
            disable_dropout(model)
            model.to(device)
    return policy.train(), critic.train(), reference, reward, sft, rm_source


def check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, rm_path: str) -> None:
    # The reward model must read the policy's ids as the text it was trained on.
    rm_tokenizer = load_tokenizer(rm_path)
    if (
        rm_tokenizer.get_vocab() != tokenizer.get_vocab()
        or rm_tokenizer.chat_template != tokenizer.chat_template
    ):
        raise ModelError(
            f"the reward model at {rm_path} uses another tokenizer or chat template than the policy"
        )


# -- data ------------------------------------------------------------------------------------------


def load_prompts(
    source: str, tokenizer, cfg: Config, limit: int | None = None
) -> tuple[list[dict], list[list[int]]]:
    records = load_records(source, "prompt", format=cfg.data_format, limit=limit).records
    return records, [prompt_ids(tokenizer, r["prompt"])[-cfg.max_prompt_length :] for r in records]


def take(total: int, count: int, position: list[int], seed: int) -> list[int]:
    """The next `count` indices of a seeded per-epoch shuffle of range(total); advances position [epoch, offset]."""
    out = []
    while len(out) < count:
        epoch, offset = position
        order = torch.randperm(
            total, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        ).tolist()
        grab = order[offset : offset + count - len(out)]
        out += grab
        position[:] = [epoch + 1, 0] if offset + len(grab) >= total else [epoch, offset + len(grab)]
    return out


def ptx_batch(
    rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> dict[str, Tensor]:
    """Right-padded demonstrations with labels on assistant tokens only (-100 elsewhere)."""
    width = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
    }
    for i, (ids, mask) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, : len(ids)] = 1
        batch["labels"][i, : len(ids)] = torch.tensor(
            [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        )
    return {key: value.to(device) for key, value in batch.items()}


def ptx_loss(policy: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy on the demonstrations' assistant tokens."""
    mask = batch["attention_mask"]
    logits = policy(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids(mask), use_cache=False
    ).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())


# -- rollouts --------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One process's rollouts with everything the update needs; all [B, R] unless noted."""

    seq: Sequences
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor  # [B] standardised, clipped, penalised reward-model scores
    kl: Tensor  # k1 per token (the KL that is logged and controlled)
    advantages: Tensor
    returns: Tensor

    def select(self, index: Tensor) -> Experience:
        """Rows `index`, with the columns that are padding in every selected row cut off."""
        seq = self.seq.select(index)
        first = int(seq.query_mask.any(0).long().argmax())
        width = max(int(seq.response_mask.sum(-1).max()), 1)
        seq = Sequences(
            seq.query[:, first:],
            seq.query_mask[:, first:],
            seq.response[:, :width],
            seq.response_mask[:, :width],
            seq.ended,
        )
        rows = [t[index][:, :width] for t in (self.logprobs, self.ref_logprobs, self.values)]
        cut = [t[index][:, :width] for t in (self.kl, self.advantages, self.returns)]
        return Experience(seq, *rows, self.scores[index], *cut)


@torch.no_grad()
def score(models: Models, seq: Sequences, cfg: Config) -> Tensor:
    """Standardised reward-model scores, clipped, minus the penalty for responses without a stop token."""
    with models.as_reward() as reward:
        scores = last_token_scores(reward, seq).clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~seq.ended).float()
    return scores


@torch.no_grad()
def collect(models: Models, seq: Sequences, cfg: Config, beta: float) -> Experience:
    logprobs = response_logprobs(models.policy_model, seq, cfg.temperature)
    with models.as_reference() as reference:
        ref_logprobs = response_logprobs(reference, seq, cfg.temperature)
    values = response_values(models.critic_model, seq)
    scores = score(models, seq, cfg)
    mask = seq.response_mask
    penalty = rl.kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * mask
    rewards = rl.shaped_rewards(scores, penalty, mask, beta)
    advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)
    kl = rl.kl_k1(logprobs, ref_logprobs) * mask
    return Experience(seq, logprobs, ref_logprobs, values * mask, scores, kl, advantages, returns)


# -- the update ------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """The mutable parts of a run that the update touches."""

    cfg: Config
    accelerator: Accelerator
    models: Models
    policy_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    policy_sched: Any
    critic_sched: Any
    generator: torch.Generator
    ptx_rows: list[tuple[list[int], list[int]]] = field(default_factory=list)
    """Tokenized demonstrations (ids, assistant mask) for PPO-ptx."""
    ptx_pad: int = 0

    def step_model(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
        self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def update(self, exp: Experience, ptx_position: list[int]) -> dict[str, float]:
        cfg, acc, models = self.cfg, self.accelerator, self.models
        stats: dict[str, list[float]] = defaultdict(list)
        size = exp.scores.shape[0]
        mini = cfg.mini_batch_size // acc.num_processes
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(size, generator=self.generator).to(exp.scores.device)
            for start in range(0, size, mini):
                part = exp.select(order[start : start + mini])
                mask = part.seq.response_mask
                logits = response_logits(models.policy, part.seq, cfg.temperature)
                logprobs = rl.logprobs_from_logits(logits, part.seq.response)
                out = rl.clipped_policy_loss(logprobs, part.logprobs, part.advantages, mask, cfg.clip_range)
                entropy = rl.masked_mean(
                    rl.entropy_from_logits(logits if cfg.entropy_coef else logits.detach()), mask
                )
                loss = out.loss - cfg.entropy_coef * entropy
                if cfg.ptx_coef > 0:
                    # Two backward passes, one gradient all-reduce: sync only on the second.
                    with acc.no_sync(models.policy):
                        acc.backward(loss)
                    pick = take(
                        len(self.ptx_rows), cfg.ptx_batch_size * acc.num_processes, ptx_position, cfg.seed
                    )
                    rows = [self.ptx_rows[i] for i in pick[acc.process_index :: acc.num_processes]]
                    batch = ptx_batch(rows, self.ptx_pad, acc.device)
                    lm = ptx_loss(models.policy, batch)
                    acc.backward(cfg.ptx_coef * lm)
                    stats["ptx_loss"].append(lm.item())
                else:
                    acc.backward(loss)
                self.step_model(models.policy, self.policy_opt, self.policy_sched)

                values = response_values(models.critic, part.seq)
                value_loss, value_clip = rl.clipped_value_loss(
                    values, part.values, part.returns, mask, cfg.value_clip_range
                )
                acc.backward(value_loss)
                self.step_model(models.critic, self.critic_opt, self.critic_sched)

                for key, value in (
                    ("policy_loss", out.loss), ("value_loss", value_loss), ("entropy", entropy), ("approx_kl", out.approx_kl),
                    ("clip_fraction", out.clip_fraction), ("value_clip_fraction", value_clip),
                ):  # fmt: skip
                    stats[key].append(value.item())
        return {key: sum(v) / len(v) for key, v in stats.items()}


# -- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    models: Models, prompts: list[list[int]], cfg: Config, acc: Accelerator, tokenizer, sft_scores: dict
) -> dict:
    """Mean score, exact KL to the reference, length, and the RM-judged win rate over the SFT policy.

    Both policies sample with the same fixed seed, so every evaluation (and the SFT side, computed once)
    sees the same random numbers.
    """
    temperature = cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature
    kl_temperature = temperature or 1.0
    mine = list(range(len(prompts)))[acc.process_index :: acc.num_processes]
    rows = []
    policy_gen = torch.Generator(acc.device).manual_seed(cfg.seed + 7919 * (acc.process_index + 1))
    sft_gen = torch.Generator(acc.device).manual_seed(cfg.seed + 7919 * (acc.process_index + 1))
    settings = dict(
        max_new_tokens=cfg.max_new_tokens,
        temperature=temperature,
        stop_ids=stop_token_ids(tokenizer),
        pad_id=tokenizer.pad_token_id,
    )
    for start in range(0, len(mine), cfg.eval_batch_size):
        chunk = mine[start : start + cfg.eval_batch_size]
        query, query_mask = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id, acc.device)
        with merged_lora(models.policy_model):
            seq = sample(models.policy_model, query, query_mask, generator=policy_gen, **settings)
        logits = response_logits(models.policy_model, seq, kl_temperature)
        with models.as_reference() as reference:
            ref_logits = response_logits(reference, seq, kl_temperature)
            if chunk[0] not in sft_scores:
                sft_seq = sample(reference, query, query_mask, generator=sft_gen, **settings)
                sft_scores.update(zip(chunk, score(models, sft_seq, cfg).tolist(), strict=True))
        kl = (rl.kl_from_logits(logits, ref_logits) * seq.response_mask).sum(-1)
        scores = score(models, seq, cfg)
        for j, i in enumerate(chunk):
            win = float(scores[j] > sft_scores[i]) + 0.5 * float(scores[j] == sft_scores[i])
            rows.append(
                {
                    "score": scores[j].item(),
                    "kl": kl[j].item(),
                    "length": seq.response_mask[j].sum().item(),
                    "win": win,
                }
            )
    rows = gather_object(rows)
    return {
        f"eval/{key}": sum(r[key] for r in rows) / max(len(rows), 1)
        for key in ("score", "kl", "length", "win")
    }


# -- the run ---------------------------------------------------------------------------------------


def run(cfg: Config, store: ArtifactStore) -> Artifact | None:
    """Train with PPO and publish a `ppo` artifact (main process); other processes return None."""
    acc = Accelerator()
    set_seed(cfg.seed)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    resume_from = resolve_resume(cfg.resume, run_dir)
    if cfg.batch_size % acc.num_processes or cfg.mini_batch_size % acc.num_processes:
        raise ValueError(
            f"batch_size and mini_batch_size must be multiples of the {acc.num_processes} processes"
        )

    sft_source = resolve_model(cfg.policy, store)
    tokenizer = load_tokenizer(sft_source.path)
    policy, critic, reference, reward, sft, rm_source = build_models(cfg, store, acc.device, tokenizer)
    check_same_tokenizer(tokenizer, rm_source.path)
    prompt_records, prompts = load_prompts(cfg.prompts, tokenizer, cfg)
    eval_prompts = (
        load_prompts(cfg.eval_prompts, tokenizer, cfg, cfg.eval_limit)[1] if cfg.eval_prompts else []
    )

    updates = cfg.steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    opts, scheds = [], []
    for model, lr in ((policy, cfg.learning_rate), (critic, cfg.value_learning_rate)):
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay
        )
        opts.append(opt)
        scheds.append(
            get_scheduler(
                cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=updates
            )
        )
    policy, critic, policy_opt, critic_opt = acc.prepare(policy, critic, *opts)
    models = Models(policy, critic, acc.unwrap_model(policy), acc.unwrap_model(critic), reference, reward)
    generator = torch.Generator(acc.device).manual_seed(cfg.seed * 1000 + acc.process_index)
    trainer = Trainer(cfg, acc, models, policy_opt, critic_opt, scheds[0], scheds[1], generator)
    if cfg.ptx_coef > 0:
        conversations = load_records(cfg.ptx_data, "conversation").records
        tokenized = [
            tokenize_conversation(tokenizer, r["messages"], cfg.ptx_max_length) for r in conversations
        ]
        trainer.ptx_rows = [(t.input_ids, t.assistant_mask) for t in tokenized if any(t.assistant_mask)]
        trainer.ptx_pad = tokenizer.pad_token_id

    kl_ctl = rl.KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    state: dict[str, Any] = {
        "step": 0,
        "prompt_position": [0, 0],
        "ptx_position": [0, 0],
        "history": [],
        "samples": [],
    }
    checkpointed = {"policy": policy, "critic": critic}
    optimizers = {
        "policy_opt": policy_opt,
        "critic_opt": critic_opt,
        "policy_sched": scheds[0],
        "critic_sched": scheds[1],
    }
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, acc, models=checkpointed, optimizers=optimizers, generator=generator
        )
        kl_ctl.load_state_dict(state["kl_controller"])
        print_main(acc, f"resumed from {resume_from} at step {state['step']}")

    writer = tensorboard(cfg, run_dir, acc)
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    sft_scores: dict[int, float] = {}
    if state["step"] == 0 and eval_prompts:
        state["history"].append(
            {"step": 0, **evaluate(models, eval_prompts, cfg, acc, tokenizer, sft_scores)}
        )
    bar = tqdm(
        total=cfg.steps, initial=state["step"], desc="ppo", disable=not (acc.is_main_process and cfg.progress)
    )
    started, episodes = time.perf_counter(), 0
    while state["step"] < cfg.steps:
        step = state["step"] + 1
        tick = time.perf_counter()
        batch = take(len(prompts), cfg.batch_size, state["prompt_position"], cfg.seed)
        mine = batch[acc.process_index :: acc.num_processes]
        query, query_mask = left_pad([prompts[i] for i in mine], pad, acc.device)
        with merged_lora(models.policy_model):
            seq = sample(
                models.policy_model, query, query_mask, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, stop_ids=stops, pad_id=pad, generator=generator,
            )  # fmt: skip
        exp = collect(models, seq, cfg, kl_ctl.beta)
        rollout_time = time.perf_counter() - tick
        metrics = trainer.update(exp, state["ptx_position"])
        seq_kl = exp.kl.sum(-1)
        totals = acc.reduce(
            torch.stack([exp.scores.mean(), seq_kl.mean(), seq.response_mask.sum(-1).mean(), seq.ended.float().mean()]), "mean"
        ).tolist()  # fmt: skip
        metrics.update(score=totals[0], kl=totals[1], length=totals[2], ended=totals[3], beta=kl_ctl.beta)
        metrics.update(
            reward=totals[0] - kl_ctl.beta * totals[1],
            rollout_s=rollout_time,
            step_s=time.perf_counter() - tick,
        )
        kl_ctl.update(totals[1], cfg.batch_size)
        episodes += cfg.batch_size
        state["step"] = step
        if cfg.sample_every and step % cfg.sample_every == 0 and acc.is_main_process:
            state["samples"] += samples(
                exp, [prompt_records[i] for i in mine], tokenizer, step, cfg.num_samples
            )
        if eval_prompts and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            metrics.update(evaluate(models, eval_prompts, cfg, acc, tokenizer, sft_scores))
        state["history"].append({"step": step, **metrics})
        log(writer, state["history"][-1], state["samples"], step)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.3f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            state["kl_controller"] = kl_ctl.state_dict()
            save_checkpoint(
                run_dir,
                step,
                acc,
                models=checkpointed,
                optimizers=optimizers,
                state=state,
                generator=generator,
                keep=cfg.keep_checkpoints,
            )
    bar.close()
    elapsed = time.perf_counter() - started
    if writer is not None:
        writer.close()
    summary = summarize(state["history"], episodes, elapsed)
    return publish(cfg, store, acc, models, tokenizer, sft, rm_source, state, summary)


def print_main(acc: Accelerator, message: str) -> None:
    if acc.is_main_process:
        print(message, flush=True)


def tensorboard(cfg: Config, run_dir: Path, acc: Accelerator):
    if cfg.report_to != "tensorboard" or not acc.is_main_process:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))


def log(writer, metrics: dict[str, float], all_samples: list[dict], step: int) -> None:
    if writer is None:
        return
    for key, value in metrics.items():
        if key != "step":
            writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
    for item in all_samples:
        if item["step"] == step:
            writer.add_text(
                "samples",
                f"**prompt**: {item['prompt']}\n\n**response**: {item['response']}\n\nscore {item['score']:.3f}",
                step,
            )


def samples(exp: Experience, records: list[dict], tokenizer, step: int, count: int) -> list[dict]:
    out = []
    for i in range(min(count, len(records))):
        length = int(exp.seq.response_mask[i].sum())
        out.append({
            "step": step,
            "prompt": records[i]["prompt"],
            "response": tokenizer.decode(exp.seq.response[i, :length], skip_special_tokens=True),
            "score": exp.scores[i].item(),
            "kl": exp.kl[i].sum().item(),
        })  # fmt: skip
    return out


def summarize(history: list[dict], episodes: int, elapsed: float) -> dict[str, float]:
    """Headline metrics for the manifest: evaluation before and after, and throughput."""
    evals = [h for h in history if "eval/score" in h]
    out: dict[str, float] = {}
    if evals:
        first, last = evals[0], evals[-1]
        out.update({
            "eval_score_initial": first["eval/score"], "eval_score_final": last["eval/score"],
            "eval_kl_final": last["eval/kl"], "eval_win_rate_final": last["eval/win"], "eval_length_final": last["eval/length"],
        })  # fmt: skip
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
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}


def publish(cfg, store, acc, models: Models, tokenizer, sft, rm_source, state, summary) -> Artifact | None:
    """Policy (adapter or full weights) + tokenizer at the root, the value model under value/, logs beside."""
    artifact = None
    if acc.is_main_process:
        base_of = lambda resolved: resolved.lineage.get("artifact") or resolved.lineage.get("model")  # noqa: E731
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            models.policy_model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            write_card(
                out, {"kind": "causal_lm", **({"adapter_base": base_of(sft)} if cfg.lora.enabled else {})}
            )
            value_dir = out / "value"
            models.critic_model.classifier.save_pretrained(value_dir)
            value_base = rm_source if cfg.value_init == "reward" else sft
            write_card(value_dir, {
                "kind": "reward", "value_model": True, "reward_mean": models.critic_model.mean, "reward_std": models.critic_model.std,
                **({"adapter_base": base_of(value_base)} if cfg.lora.enabled else {}),
            })  # fmt: skip
            write_jsonl(out / "metrics.jsonl", state["history"])
            write_jsonl(out / "samples.jsonl", state["samples"])
            inputs = [sft.lineage | {"role": "policy"}, rm_source.lineage | {"role": "reward"}]
            for path, role in (
                (cfg.prompts, "prompts"),
                (cfg.eval_prompts, "eval_prompts"),
                (cfg.ptx_data if cfg.ptx_coef else None, "ptx"),
            ):
                if path:
                    inputs.append(
                        (dataset_fingerprint(path) if Path(path).is_file() else {"dataset": path})
                        | {"role": role}
                    )
            artifact = store.publish(
                "ppo", out, config=to_dict(cfg), inputs=inputs, metrics=summary,
                meta={"adapter": cfg.lora.enabled, "value_init": cfg.value_init, "base_policy": base_of(sft)},
            )  # fmt: skip
    acc.wait_for_everyone()
    return artifact


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
