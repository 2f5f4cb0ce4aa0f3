"""Stage 2: a reward model trained on K-wise ranked comparisons, InstructGPT style.

One prompt with its K ranked completions is one batch element. All completions of all groups in a
batch go through the model in one forward pass, each exactly once, and the loss is taken over every
ranked pair of a group (losses.py). TRL's RewardTrainer only knows chosen/rejected pairs, which would
forward each completion K-1 times, so the loop is our own, on Accelerate: the same code runs on one CPU,
a GPU, or under `accelerate launch` on many.

The model is a one-output sequence classifier on the SFT policy's trunk, with the policy's tokenizer and
chat template. After training it scores the SFT demonstrations, and the reward artifact records their
mean and standard deviation (and InstructGPT's bias: the shift that makes them average 0), so stage 3
needs nothing but the artifact. The held-out evaluation and that normalisation are in evaluate.py.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, SchedulerType, get_scheduler

from pipeline.checkpoints import (
    load_rng,
    load_trainable,
    save_checkpoint,
    set_peak_learning_rate,
    start_or_resume,
    trainable_state,
)
from pipeline.config import to_dict
from pipeline.data_sources import data_file, data_input
from pipeline.datasets import DataError, load_records
from pipeline.model_card import write_model_card
from pipeline.models import (
    LoraSettings,
    ModelError,
    ResolvedModel,
    apply_lora,
    disable_dropout,
    load_reward_model,
    load_tokenizer,
    resolve_model,
    training_dtype,
    write_card,
)
from pipeline.packed_attention import PACKED_SDPA, use_packed_attention
from pipeline.scoring import RewardScorer
from pipeline.store import Artifact, ArtifactStore, default_store_root
from pipeline.tracking import flat_config, run_folder, tracker_names
from stages.reward.evaluate import batch_loss, evaluate, normalisation_rows, normalisation_stats
from stages.reward.groups import (
    DataCounts,
    Group,
    batch_for_step,
    batch_scores,
    bucket_batches,
    check_plain_text,
    collate,
    template_name,
    tokenize_comparisons,
)


@dataclass
class Config:
    """Stage 2 settings; any key can be set in the YAML file or as `--key value`."""

    RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate", "init": "model"}

    store: str = field(default_factory=default_store_root)
    """Artifact store root: a folder or an fsspec URL (s3://bucket/prefix)."""
    model: str = "sft:latest"
    """Model whose trunk the reward model starts from: an sft artifact (InstructGPT) or any model source."""
    data: str | None = None
    """Ranked comparisons to train on (any format pipeline.datasets converts to comparisons); required."""
    data_format: str = "auto"
    """Format of `data` and `eval_data`: auto, canonical, hh-rlhf, oasst, trl."""
    eval_data: str | None = None
    """Held-out comparisons; when unset, `eval_fraction` of the groups in `data` is held out."""
    eval_fraction: float = 0.1
    """Share of groups held out (chosen by `seed`) when `eval_data` is unset."""
    eval_limit: int | None = None
    """Evaluate on at most this many held-out groups (a seeded choice); null: all of them."""
    skip_invalid: bool = False
    """Drop invalid records (and count them) instead of stopping at the first one."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapter settings (the score head is always trained); `lora.enabled: false` trains every weight."""
    loss: Literal["pairwise", "plackett-luce"] = "pairwise"
    """pairwise: InstructGPT's mean over ranked pairs; plackett-luce: listwise likelihood of the ranking."""
    margin: bool = False
    """Subtract a record's "margin" value (when it has one) from each of its pairs' score difference."""
    learning_rate: float = 1e-4
    """Peak learning rate (1e-4 suits LoRA; ~1e-5 for full fine-tuning)."""
    lr_scheduler: str = "linear"
    """transformers scheduler name: linear (to 0, as InstructGPT), cosine, constant, ..."""
    warmup_steps: float = 0
    """Optimizer steps of learning-rate warm-up; a value below 1 is a share of all steps."""
    epochs: int = 1
    """Passes over the training groups (InstructGPT trains one: more overfits)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 runs `epochs`."""
    groups_per_batch: int = 8
    """Prompts (each with all its K completions) per device per optimizer step."""
    max_length: int = 512
    """Tokens of prompt + completion; longer prompts are cut on the left."""
    max_grad_norm: float = 1.0
    """Gradient norm clip."""
    share_prompts: bool = True
    """Forward each group's prompt once, not once per completion (the same scores for about a third less
    compute on HH-RLHF); needs sdpa attention. false: every completion padded to the batch's longest."""
    eval_every: int = 50
    """Evaluate on the held-out groups every this many steps (0: only at the end)."""
    logging_every: int = 10
    """Log the mean training loss and the learning rate every this many steps (0: only at the end)."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps; 0 saves none."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run folder (older ones are deleted)."""
    normalise_on: str | None = None
    """Demonstrations (conversations) whose final replies set reward mean/std; unset: the best-ranked completions."""
    normalise_limit: int | None = None
    """Score at most this many demonstrations (the first ones) for the normalisation; unset: all."""
    seed: int = 0
    """Seed for the held-out split, data order and the score head's initialisation."""
    report_to: str | list[str] = "tensorboard"
    """Trackers: tensorboard, wandb, mlflow, trackio, ... (any Accelerate tracker), a list of them, or none."""
    output_dir: str = "runs"
    """Parent of the run folder (checkpoints, TensorBoard events)."""
    run_name: str = "reward"
    """Run folder name under output_dir; `--resume latest` looks there."""
    resume: str | None = None
    """`latest` (newest checkpoint of this run, or a fresh start when none) or a checkpoint folder."""
    force: bool = False
    """On resume, accept settings that differ from the checkpoint's and would alter the run."""

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")
        if self.groups_per_batch < 1 or self.epochs < 1:
            raise ValueError("groups_per_batch and epochs must be at least 1")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be positive or -1 (run `epochs`), got {self.max_steps}")
        tracker_names(self.report_to)  # an unknown or missing tracker fails before any work
        if self.margin and self.loss != "pairwise":
            raise ValueError("margin applies to the pairwise loss only; set loss: pairwise or margin: false")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be at least 1 (or unset), got {self.eval_limit}")
        if self.normalise_limit is not None and self.normalise_limit < 1:
            raise ValueError(f"normalise_limit must be at least 1 (or unset), got {self.normalise_limit}")
        for name in ("eval_every", "logging_every", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        SchedulerType(self.lr_scheduler)  # an unknown name fails here, not after the model has loaded
        if not self.data:
            raise ValueError(
                "data is not set: name the ranked comparisons to train on (data: FILE, or --data FILE)"
            )


def run(cfg: Config, store: ArtifactStore) -> Artifact | None:
    """Train the reward model and publish a `reward` artifact (main process); other processes return None."""
    accelerator = Accelerator(log_with=tracker_names(cfg.report_to) or None, project_dir=cfg.output_dir)
    set_seed(cfg.seed)
    # Artifact references (`labels:latest`) become their payload files, once: read and recorded below.
    data, eval_data = (data_file(path, "comparison", store) for path in (cfg.data, cfg.eval_data))
    cfg = replace(
        cfg, data=data, eval_data=eval_data, normalise_on=data_file(cfg.normalise_on, "conversation", store)
    )
    run_dir = Path(cfg.output_dir) / cfg.run_name
    resume_from = start_or_resume(run_dir, cfg.resume, to_dict(cfg), force=cfg.force)
    resolved = resolve_model(cfg.model, store)
    tokenizer = load_tokenizer(resolved.path)
    check_chat_template(resolved, tokenizer, cfg.model)

    train_groups, eval_groups, counts = load_groups(cfg, tokenizer)
    set_seed(cfg.seed)  # the head and adapter are drawn from the global generator: not from what loading drew
    model = build_model(cfg, resolved, tokenizer, store, training_dtype(accelerator.device))
    scorer = RewardScorer(model)
    optimizer = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=cfg.learning_rate)
    batches = bucket_batches(train_groups, cfg.groups_per_batch, cfg.seed)
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    per_epoch = math.ceil(len(batches) / accelerator.num_processes)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * per_epoch
    warmup = int(cfg.warmup_steps) if cfg.warmup_steps >= 1 else math.ceil(cfg.warmup_steps * total_steps)
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    losses: list[float] = []  # every step's loss, averaged over processes
    if resume_from is not None:
        losses = load_checkpoint(resume_from, accelerator, scorer, optimizer, scheduler)
        set_peak_learning_rate(optimizer, scheduler, cfg.learning_rate)
    accelerator.init_trackers(run_dir.name, config=flat_config(to_dict(cfg)))

    step, started = len(losses), time.perf_counter()
    progress = tqdm(
        total=total_steps, initial=step, desc="reward", disable=not accelerator.is_local_main_process
    )
    while step < total_steps:
        index = batch_for_step(
            step, len(batches), accelerator.process_index, accelerator.num_processes, cfg.seed
        )
        batch = collate(batches[index], tokenizer.pad_token_id, share_prompts=cfg.share_prompts)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        scorer.train()
        loss = batch_loss(cfg, batch_scores(scorer, batch), batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if cfg.logging_every and step % cfg.logging_every == 0:
            since = losses[-cfg.logging_every :]
            accelerator.log(
                {"train/loss": sum(since) / len(since), "train/learning_rate": scheduler.get_last_lr()[0]},
                step=step,
            )
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            evaluation = evaluate(scorer, eval_groups, cfg, accelerator, tokenizer.pad_token_id)
            accelerator.log({f"eval/{k}": v for k, v in evaluation.items()}, step=step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(
                run_dir, step, accelerator, config=to_dict(cfg), keep=cfg.keep_checkpoints,
                write=lambda folder: write_checkpoint(folder, accelerator, scorer, optimizer, scheduler, losses),
            )  # fmt: skip
    progress.close()
    train_seconds = time.perf_counter() - started
    evaluation = evaluate(scorer, eval_groups, cfg, accelerator, tokenizer.pad_token_id)
    accelerator.log({f"eval/{k}": v for k, v in evaluation.items()}, step=step)
    accelerator.print("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))

    stats = normalisation_stats(
        scorer,
        normalisation_rows(cfg, tokenizer, train_groups),
        accelerator=accelerator,
        tokenizer=tokenizer,
        share_prompts=cfg.share_prompts,
    )
    metrics: dict[str, Any] = {f"eval_{k}": v for k, v in evaluation.items()}
    metrics |= {
        "train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "steps": step,
        "train_groups": len(train_groups),
        "eval_groups": len(eval_groups),
        "train_pairs": sum(count_pairs(g.ranks) for g in train_groups),
        "skipped_no_pairs": counts.skipped_no_pairs,
        "truncated_prompts": counts.truncated_prompts,
        "truncated_completions": counts.truncated_completions,
        "dropped_invalid": counts.dropped_invalid,
        "train_seconds": round(train_seconds, 2),  # after a resume: this session's
        **stats,
    }
    artifact = publish(cfg, store, accelerator, scorer, tokenizer, resolved, metrics, stats, run_dir)
    # Not accelerator.end_training(): that also destroys the process group, which `rlhf run`'s next stage needs.
    for tracker in accelerator.trackers:
        tracker.finish()
    return artifact


# -- checkpoints -----------------------------------------------------------------------------------


def write_checkpoint(
    folder: Path, accelerator: Accelerator, scorer, optimizer, scheduler, losses: list[float]
) -> None:
    """The trained tensors (adapter and score head, or every weight), optimizer and schedule, and the losses so
    far (their count is the step, and so the data position); pipeline.checkpoints adds the RNG states and config."""
    save_file(trainable_state(accelerator.unwrap_model(scorer)), str(folder / "trainable.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / "optimizer.pt"
    )
    (folder / "losses.json").write_text(json.dumps(losses), encoding="utf-8")


def load_checkpoint(folder: Path, accelerator: Accelerator, scorer, optimizer, scheduler) -> list[float]:
    """Restore what write_checkpoint saved and this process's RNG state; return the losses so far."""
    load_trainable(accelerator.unwrap_model(scorer), folder / "trainable.safetensors")
    saved = torch.load(folder / "optimizer.pt", map_location=accelerator.device, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    load_rng(folder, accelerator.process_index)
    return json.loads((folder / "losses.json").read_text(encoding="utf-8"))


# -- data ------------------------------------------------------------------------------------------


def load_groups(
    cfg: Config, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Group], list[Group], DataCounts]:
    """Train and held-out groups, tokenized; counts of what was skipped, truncated or dropped."""
    counts = DataCounts()
    sources = [(cfg.data, "train")] + ([(cfg.eval_data, "eval")] if cfg.eval_data else [])
    tokenized: dict[str, list[Group]] = {}
    for source, role in sources:
        loaded = load_records(source, "comparison", format=cfg.data_format, skip_invalid=cfg.skip_invalid)
        check_plain_text(loaded.records, loaded.source, template_name(tokenizer))
        groups, seen = tokenize_comparisons(tokenizer, loaded.records, cfg.max_length, use_margin=cfg.margin)
        counts.add(seen, dropped_invalid=loaded.dropped)
        tokenized[role] = groups
    if cfg.eval_data:
        train, held_out = tokenized["train"], tokenized["eval"]
    else:
        train, held_out = split_groups(tokenized["train"], cfg.eval_fraction, cfg.seed)
    if cfg.eval_limit is not None and len(held_out) > cfg.eval_limit:
        held_out = random.Random(cfg.seed).sample(held_out, cfg.eval_limit)
    if not train or not held_out:
        raise DataError(
            cfg.data, None, "<file>", f"{len(train)} training and {len(held_out)} held-out groups with a ranked "
            "pair: a reward model needs both; add comparisons or set eval_data"
        )  # fmt: skip
    return train, held_out, counts


def split_groups(groups: list[Group], fraction: float, seed: int) -> tuple[list[Group], list[Group]]:
    """A seeded random `fraction` of the groups held out (at least one when there are two or more)."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(groups))) if len(groups) > 1 else 0
    held = set(order[:n_eval])
    return [g for i, g in enumerate(groups) if i not in held], [g for i, g in enumerate(groups) if i in held]


def count_pairs(ranks: list[int]) -> int:
    return sum(a < b for a in ranks for b in ranks)


# -- model -----------------------------------------------------------------------------------------


def check_chat_template(resolved: ResolvedModel, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """The reward model must render prompts exactly as the policy it will judge was trained to."""
    if resolved.card.get("kind") != "causal_lm":
        return  # a base model: its own template, or the default ChatML one the SFT stage would also use
    policy_template = resolved.card.get("chat_template")
    if not policy_template:
        raise ModelError(
            f"{source}: the policy's model card records no chat template, so the reward model cannot render "
            "prompts the way the policy saw them; re-run `rlhf sft` (it saves the template) or set model to a "
            "base model"
        )
    if policy_template != tokenizer.chat_template:
        raise ModelError(
            f"{source}: the tokenizer's chat template differs from the one the policy was trained with "
            f"({template_name(tokenizer)} vs the model card's); the artifact's tokenizer files were changed "
            "after training: re-run `rlhf sft` or restore its tokenizer"
        )


def build_model(
    cfg: Config, resolved: ResolvedModel, tokenizer: PreTrainedTokenizerBase, store: ArtifactStore, dtype
) -> torch.nn.Module:
    """A one-output sequence classifier on the trunk of `model`; wrapped in a SEQ_CLS adapter when LoRA is on."""
    model = load_reward_model(resolved, store, dtype)
    missing = len(tokenizer) - model.get_input_embeddings().weight.shape[0]
    if missing > 0:
        if cfg.lora.enabled:
            raise ModelError(
                f"the tokenizer of {cfg.model} needs {missing} new token embeddings, which an adapter cannot "
                "save; start from an sft artifact (model: sft:latest) or set lora.enabled: false"
            )
        model.resize_token_embeddings(len(tokenizer))
    # (pipeline.models.match_vocab also sets a generation config, which a classifier does not have.)
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)  # a score must not depend on a dropout draw
    if cfg.share_prompts:
        use_packed_attention(model)
        if model.config._attn_implementation != PACKED_SDPA:
            raise ModelError(
                f"share_prompts lays each prompt out once for its completions, which needs sdpa attention; "
                f"{cfg.model} uses {model.config._attn_implementation}: set share_prompts: false"
            )
    # SEQ_CLS makes peft train and save the freshly initialised score head along with the adapter.
    return apply_lora(model, cfg.lora, task_type="SEQ_CLS")


# -- publishing ------------------------------------------------------------------------------------


def publish(
    cfg: Config,
    store: ArtifactStore,
    accelerator: Accelerator,
    scorer: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    resolved: ResolvedModel,
    metrics: dict[str, Any],
    stats: dict[str, float],
    run_dir: Path,
) -> Artifact | None:
    """Save adapter (or full model), tokenizer and model card; the main process publishes them."""
    # Collective under ZeRO-3/FSDP (every process gathers its shard); a plain state dict otherwise.
    state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(scorer).items()}
    artifact = None
    if accelerator.is_main_process:
        adapter_base = resolved.lineage.get("artifact") or resolved.lineage.get("model")
        card = {
            "kind": "reward",
            **({"adapter_base": adapter_base} if cfg.lora.enabled else {}),
            "reward_mean": stats["reward_mean"],
            "reward_std": stats["reward_std"],
            "reward_bias": stats["reward_bias"],
            "max_length": cfg.max_length,
            "chat_template": tokenizer.chat_template,
            # How stage 3 must score: the head at the last token of prompt + completion (its end of turn).
            "score": "last token of chat-templated prompt + completion; position ids count real tokens",
        }
        inputs = [resolved.lineage] + [
            {**fingerprint(path), "role": role}
            for path, role in ((cfg.data, "train"), (cfg.eval_data, "eval"), (cfg.normalise_on, "normalise"))
            if path
        ]
        with tempfile.TemporaryDirectory() as tmp:
            accelerator.unwrap_model(scorer).model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            write_card(Path(tmp), card)
            meta = {k: card[k] for k in ("reward_mean", "reward_std", "reward_bias", "max_length")}
            meta |= {"adapter": cfg.lora.enabled, "init": adapter_base, "loss": cfg.loss}
            meta |= run_folder(run_dir)
            manifest = dict(config=to_dict(cfg), inputs=inputs, metrics=metrics, meta=meta)
            write_model_card(tmp, "reward", store=store, **manifest)  # README.md: replaces peft's template
            artifact = store.publish("reward", tmp, **manifest)
    accelerator.wait_for_everyone()
    return artifact


def fingerprint(path: str) -> dict[str, str]:
    """A content hash for a local file (naming its artifact if it lies in one); a Hub dataset by name."""
    return data_input(path)
