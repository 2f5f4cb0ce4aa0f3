"""Stage 1: supervised fine-tuning on dialogue demonstrations, with TRL's SFTTrainer underneath.

The conversations are tokenized here (pipeline.chat), so the loss covers assistant tokens only, and
exactly the way later stages tokenize prompts and replies. Batches are padding-free by default: the
collator concatenates a batch into one row with restarting position ids, so pad tokens cost nothing,
and pipeline.packed_attention runs attention per sequence instead of over a dense row-wide mask.
The result is published as an `sft` artifact: adapter (or full weights), tokenizer with its chat
template, `rlhf_model.json`, and the metrics.
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, SchedulerType, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from pipeline.chat import tokenize_conversation
from pipeline.checkpoints import mark_complete, set_peak_learning_rate, start_or_resume
from pipeline.config import ConfigError, to_dict
from pipeline.data_sources import data_file, data_input
from pipeline.datasets import DataError, load_records
from pipeline.model_card import write_model_card
from pipeline.models import (
    EMBEDDED_MODEL,
    LoraSettings,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    match_vocab,
    resolve_model,
    training_dtype,
    write_card,
)
from pipeline.packed_attention import use_packed_attention
from pipeline.processes import process_state
from pipeline.store import Artifact, ArtifactStore, default_store_root
from pipeline.tracking import TrackerCallback, finish_trackers, run_folder, start_trackers, tracker_names

IGNORE_INDEX = -100


@dataclass
class Config:
    """Stage 1 settings; any key can be set in the YAML file or as `--key value`."""

    RENAMED: ClassVar[dict[str, str]] = {
        "eval_steps": "eval_every",
        "logging_steps": "logging_every",
        "warmup_ratio": "warmup_steps",
    }

    store: str = field(default_factory=default_store_root)
    """Artifact store root: a folder or an fsspec URL (s3://bucket/prefix)."""
    model: str = EMBEDDED_MODEL
    """Model source: the embedded default, a .gguf file, an artifact reference, a folder or a Hub id."""
    data: str | None = None
    """Conversations to train on (any format pipeline.datasets converts to conversations); required."""
    data_format: str = "auto"
    """Format of `data`: auto, canonical, sharegpt, alpaca, oasst, ..."""
    eval_data: str | None = None
    """Held-out conversations; when unset, `eval_fraction` of `data` is held out."""
    eval_fraction: float = 0.05
    """Share of `data` held out for the evaluation loss when `eval_data` is unset."""
    skip_invalid: bool = False
    """Drop invalid records (and report how many) instead of stopping at the first one."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapter settings; `lora.enabled: false` fine-tunes every weight."""
    max_length: int = 512
    """Conversations are cut to this many tokens (on the right)."""
    padding_free: bool = True
    """Concatenate each batch into one row (no pad tokens); false pads every row to the longest."""
    batch_size: int = 8
    """Conversations per device per optimizer step (before gradient accumulation)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: far less memory on
    large models or long rows, at the cost of a second forward pass per step. Off by default (TRL turns it on),
    since the models and rows this runs on in minutes fit without it; turn it on when memory runs out."""
    learning_rate: float = 2e-4
    """Peak learning rate (2e-4 suits LoRA; use ~2e-5 for full fine-tuning)."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 runs `epochs`."""
    warmup_steps: float = 0.03
    """Optimizer steps of learning-rate warm-up; a value below 1 is a share of all steps (0.03: the first 3%)."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name: cosine, linear, constant, ..."""
    eval_every: int = 0
    """Evaluate every this many steps; 0 evaluates only before and after training."""
    logging_every: int = 10
    """Log loss and learning rate every this many steps; 0 logs only the final loss."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps; 0 saves none."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run folder (older ones are deleted)."""
    report_to: str | list[str] = "tensorboard"
    """Trackers: tensorboard, wandb, mlflow, trackio, ... (any Accelerate tracker), a list of them, or none."""
    output_dir: str = "runs"
    """Parent of the run folder (checkpoints, TensorBoard events)."""
    run_name: str = "sft"
    """Run folder name under output_dir; `--resume latest` looks there."""
    resume: str | None = None
    """`latest` (newest checkpoint of this run, or a fresh start when none) or a checkpoint folder."""
    force: bool = False
    """On resume, accept settings that differ from the checkpoint's and would alter the run."""
    seed: int = 0
    """Seed for data order, the held-out split and initialisation."""
    trainer_args: dict[str, Any] = field(default_factory=dict)
    """Extra trl.SFTConfig / transformers.TrainingArguments keys, passed through as they are."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be at least 1")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be positive or -1 (run `epochs`), got {self.max_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be 0 or more, got {self.warmup_steps}")
        SchedulerType(self.lr_scheduler)  # an unknown name fails here, not after the model has loaded
        tracker_names(self.report_to)  # an unknown or missing tracker fails before any work
        for name in ("eval_every", "logging_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (at the end only) or more, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if not self.data:
            raise ValueError(
                "data is not set: name the conversations to train on (data: FILE, or --data FILE)"
            )


def tokenize_dataset(
    records: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[Dataset, int]:
    """Token ids and assistant-only labels per conversation; drops those left with no assistant token."""
    rows, dropped = [], 0
    for record in records:
        tokens = tokenize_conversation(tokenizer, record["messages"], max_length)
        if not any(tokens.assistant_mask):
            dropped += 1
            continue
        labels = [
            t if m else IGNORE_INDEX for t, m in zip(tokens.input_ids, tokens.assistant_mask, strict=True)
        ]
        rows.append({"input_ids": tokens.input_ids, "labels": labels})
    return Dataset.from_list(rows), dropped


def split_holdout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic held-out split; at least one record on each side when there are two or more."""
    if fraction == 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(records) * fraction)), len(records) - 1)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


class AssistantLossTrainer(SFTTrainer):
    """TRL's SFTTrainer with a plain, unchunked loss over the positions that have a label.

    TRL computes the loss with a tiled vocabulary projection that recomputes the logits in the backward
    pass and derives entropy and top-1 metrics from every tile: on GPUs it saves memory, on a CPU it is a
    third of a step. Here the model projects only the positions that predict a label (the assistant
    tokens), once; the loss is TRL's: the sum over labelled tokens divided by the tokens in the whole
    accumulated batch. The logged `mean_token_accuracy` stays; the entropy, a softmax over the
    vocabulary for every token, is not computed.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs["labels"][:, 1:]
        # Columns where some row has a label; a padding-free batch is one row, so exactly the labelled ones.
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
        features = {key: value for key, value in inputs.items() if key != "labels"}
        logits = model(**features, use_cache=False, logits_to_keep=keep).logits.float()
        targets = targets[:, keep]
        loss_sum = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        labelled = targets != IGNORE_INDEX
        count = labelled.sum() if num_items_in_batch is None else num_items_in_batch
        loss = loss_sum / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        with torch.no_grad():
            correct = ((logits.argmax(-1) == targets) & labelled).sum()
            # reduce, not gather_for_metrics: that one trims the last evaluation batch's "samples".
            correct, total = self.accelerator.reduce(torch.stack([correct, labelled.sum()]), "sum")
        mode = "train" if model.training else "eval"
        self._metrics[mode]["mean_token_accuracy"].append((correct / total.clamp(min=1)).item())
        return (loss, {"logits": logits}) if return_outputs else loss


def trainer_settings(cfg: Config, run_dir: Path, has_eval: bool, dtype: torch.dtype) -> SFTConfig:
    """TRL's own config from ours; `trainer_args` may override any of these keys."""
    settings = dict(
        bf16=dtype == torch.bfloat16,
        output_dir=str(run_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        activation_checkpointing=cfg.activation_checkpointing,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        logging_strategy="steps" if cfg.logging_every else "no",
        logging_steps=cfg.logging_every or 500,
        eval_strategy="steps" if has_eval and cfg.eval_every > 0 else "no",
        eval_steps=cfg.eval_every or None,
        # transformers writes each checkpoint; CheckpointMarks marks it complete and deletes old ones.
        save_strategy="steps" if cfg.checkpoint_every else "no",
        save_steps=cfg.checkpoint_every or 500,
        save_total_limit=None,
        report_to=[],  # our TrackerCallback logs, under the metric names every stage uses
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=None,  # conversations are already cut to cfg.max_length by tokenize_dataset
        padding_free=cfg.padding_free,
        dataloader_drop_last=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
    )
    try:
        return SFTConfig(**(settings | cfg.trainer_args))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{err} (see trl.SFTConfig for the valid keys and values)") from None


class CheckpointMarks(TrainerCallback):
    """Marks each checkpoint the Trainer saved as complete, with the run's resolved config (for `--resume`), and
    keeps the newest `keep`; on resume, puts this config's peak learning rate into the restored schedule."""

    def __init__(self, config: dict[str, Any], keep: int):
        self.config, self.keep = config, keep

    def on_save(self, args, state, control, **kwargs):
        process_state().wait_for_everyone()  # every process has written its RNG state into the folder
        if state.is_world_process_zero:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.config, self.keep)

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        # Called after the Trainer loaded a checkpoint's optimizer and schedule, whose peak rate is the old one.
        if state.global_step > 0:
            set_peak_learning_rate(optimizer, lr_scheduler, args.learning_rate)


def run(cfg: Config, store: ArtifactStore) -> Artifact | None:
    """Fine-tune `cfg.model` on `cfg.data` and publish an `sft` artifact (main process only)."""
    set_seed(cfg.seed)
    # An artifact reference (`labels:latest`) becomes its conversations file, once: read and recorded below.
    data, eval_data = (data_file(path, "conversation", store) for path in (cfg.data, cfg.eval_data))
    cfg = replace(cfg, data=data, eval_data=eval_data)
    # Read and validate the data before spending time on the model: bad input fails in a second.
    loaded = load_records(cfg.data, "conversation", format=cfg.data_format, skip_invalid=cfg.skip_invalid)
    if cfg.eval_data:
        train_records = loaded.records
        eval_records = load_records(cfg.eval_data, "conversation", skip_invalid=cfg.skip_invalid).records
    else:
        train_records, eval_records = split_holdout(loaded.records, cfg.eval_fraction, cfg.seed)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    resume_from = start_or_resume(run_dir, cfg.resume, to_dict(cfg), force=cfg.force)
    source = resolve_model(cfg.model, store)
    tokenizer = load_tokenizer(source.path)
    dtype = training_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_causal_lm(source, store, dtype=dtype)
    match_vocab(model, tokenizer)
    if cfg.padding_free:
        use_packed_attention(model)
    set_seed(cfg.seed)  # the adapter is drawn from the global generator: not from what a GGUF conversion left
    model = apply_lora(model, cfg.lora)

    train_set, dropped_train = tokenize_dataset(train_records, tokenizer, cfg.max_length)
    eval_set, dropped_eval = tokenize_dataset(eval_records, tokenizer, cfg.max_length)
    if len(train_set) == 0:
        raise DataError(
            cfg.data, None, "<file>", f"no conversation has an assistant token within max_length="
            f"{cfg.max_length}: raise max_length or shorten the prompts"
        )  # fmt: skip

    trainer = AssistantLossTrainer(
        model=model,
        args=trainer_settings(cfg, run_dir, has_eval=len(eval_set) > 0, dtype=dtype),
        train_dataset=train_set,
        eval_dataset=eval_set if len(eval_set) else None,
        processing_class=tokenizer,
        callbacks=[CheckpointMarks(to_dict(cfg), cfg.keep_checkpoints)],
    )
    trackers = start_trackers(tracker_names(cfg.report_to), run_dir, to_dict(cfg))
    trainer.add_callback(TrackerCallback(trackers))
    eval_before = trainer.evaluate()["eval_loss"] if len(eval_set) else None
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics: dict[str, Any] = {}
    if len(eval_set):
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        metrics["eval_loss_before"] = eval_before
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    metrics |= {
        "train_loss": result.training_loss,  # after a resume: the mean over the steps this session ran
        "train_steps": result.global_step,
        "train_conversations": len(train_set),
        "eval_conversations": len(eval_set),
        "invalid_records_dropped": loaded.dropped,
        "no_assistant_tokens_dropped": dropped_train + dropped_eval,
        "train_seconds": result.metrics.get("train_runtime"),
    }
    finish_trackers(trackers)

    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return None
    inputs = [source.lineage, data_input(cfg.data)]
    if cfg.eval_data:
        inputs.append(data_input(cfg.eval_data))
    model = trainer.accelerator.unwrap_model(trainer.model)
    return publish(model, tokenizer, cfg, store, inputs, metrics, source, run_dir)


def publish(
    model, tokenizer, cfg: Config, store: ArtifactStore, inputs, metrics, source, run_dir
) -> Artifact:
    """Save adapter or full weights with the tokenizer and model card, then publish them as one artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        model.config._attn_implementation = (
            "sdpa"  # a checkpoint must load where our kernel is not registered
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        card = {"kind": "causal_lm", "chat_template": tokenizer.chat_template}
        if cfg.lora.enabled:
            # The adapter's own base path may be a cache folder; the card names the source that resolves anywhere.
            card["adapter_base"] = source.lineage.get("artifact") or source.lineage.get("model")
        write_card(Path(tmp), card)
        meta = {"adapter": cfg.lora.enabled, "base_model": card.get("adapter_base") or cfg.model}
        manifest = dict(config=to_dict(cfg), inputs=inputs, metrics=metrics, meta=meta | run_folder(run_dir))
        write_model_card(tmp, "sft", store=store, **manifest)  # README.md: replaces peft's empty template
        return store.publish("sft", tmp, **manifest)
