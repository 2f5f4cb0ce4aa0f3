"""The reward stage's held-out evaluation, the loss it shares with training, and the normalisation.

After training, `evaluate` reports held-out pairwise accuracy (pooled and per K), margin, Kendall tau and
loss; `normalisation_stats` scores the SFT demonstrations, whose mean and standard deviation become the
reward artifact's units (0 = a typical demonstration). Every process runs the same number of forwards
(`process_batches`) and the sums are reduced across processes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from pipeline.chat import tokenize_completion
from pipeline.datasets import load_records
from stages.reward.groups import Group, batch_scores, bucket_batches, check_plain_text, collate, template_name
from stages.reward.losses import add_sums, pairwise_loss, plackett_luce_loss, ranking_metrics, ranking_sums

if TYPE_CHECKING:
    from stages.reward.train import Config


def batch_loss(cfg: Config, scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if cfg.loss == "plackett-luce":
        return plackett_luce_loss(scores, batch["ranks"], batch["groups"])
    return pairwise_loss(scores, batch["ranks"], batch["groups"], batch["margins"] if cfg.margin else None)


def process_batches(
    groups: list[Group], per_batch: int, seed: int, accelerator: Accelerator
) -> tuple[list[list[Group]], int]:
    """This process's share of the batches, and how many forwards every process must run.

    Shards, FSDP in particular, need every process to run the same number of forward passes, so a process
    with fewer batches repeats one and ignores the result.
    """
    batches = bucket_batches(groups, per_batch, seed)
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    return mine, math.ceil(len(batches) / accelerator.num_processes)


@torch.no_grad()
def evaluate(
    scorer: torch.nn.Module, groups: list[Group], cfg: Config, accelerator: Accelerator, pad_id: int
) -> dict[str, float]:
    """Held-out pairwise accuracy (pooled and per K), mean margin, Kendall tau and loss."""
    scorer.eval()
    # Every process must hold the same keys to add them up: list every K of the held-out set.
    sums = {key: 0.0 for key in ("pairs", "correct", "margin", "groups", "tau", "loss")}
    for k in sorted({len(g.rows) for g in groups}):
        sums[f"pairs_k{k}"] = sums[f"correct_k{k}"] = 0.0
    mine, rounds = process_batches(groups, cfg.groups_per_batch, cfg.seed, accelerator)
    for i in range(rounds):
        batch = collate(mine[i] if i < len(mine) else groups[:1], pad_id, share_prompts=cfg.share_prompts)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        scores = batch_scores(scorer, batch)
        if i >= len(mine):
            continue  # a padding round (see process_batches)
        add_sums(sums, ranking_sums(scores, batch["ranks"], batch["groups"]))
        sums["loss"] += float(batch_loss(cfg, scores, batch)) * len(mine[i])
    keys = sorted(sums)
    totals = accelerator.reduce(torch.tensor([sums[k] for k in keys], device=accelerator.device), "sum")
    sums = dict(zip(keys, totals.tolist(), strict=True))
    return ranking_metrics(sums) | {"loss": sums["loss"] / max(sums["groups"], 1.0)}


def normalisation_rows(
    cfg: Config, tokenizer: PreTrainedTokenizerBase, train_groups: list[Group]
) -> list[Group]:
    """Demonstrations as one-row groups: prompt = the turns before the last reply, completion = that reply."""
    if cfg.normalise_on is None:
        # No demonstrations: the best-ranked completion of each training prompt stands in for one.
        return [Group([g.rows[g.ranks.index(min(g.ranks))]], [0]) for g in train_groups]
    loaded = load_records(
        cfg.normalise_on, "conversation", skip_invalid=cfg.skip_invalid, limit=cfg.normalise_limit
    )
    check_plain_text(loaded.records, loaded.source, template_name(tokenizer))
    rows = []
    for record in loaded.records:
        *prompt, reply = record["messages"]  # a conversation ends with an assistant turn
        rows.append(
            Group([tokenize_completion(tokenizer, prompt, reply["content"], cfg.max_length).input_ids], [0])
        )
    return rows


@torch.no_grad()
def normalisation_stats(
    scorer: torch.nn.Module,
    rows: list[Group],
    *,
    accelerator: Accelerator,
    tokenizer: PreTrainedTokenizerBase,
    share_prompts: bool,
) -> dict[str, float]:
    """Mean and standard deviation of the raw reward over the demonstrations, and the bias that zeroes the mean."""
    scorer.eval()
    mine, rounds = process_batches(rows, 32, 0, accelerator)
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # count, sum, sum of squares
    for i in range(rounds):
        batch = collate(
            mine[i] if i < len(mine) else rows[:1], tokenizer.pad_token_id, share_prompts=share_prompts
        )
        scores = batch_scores(scorer, {k: v.to(accelerator.device) for k, v in batch.items()})
        if i < len(mine):
            scores = scores.double()
            sums += torch.stack(
                [torch.tensor(len(scores), dtype=torch.float64), scores.sum(), (scores**2).sum()]
            )
    count, total, squares = accelerator.reduce(sums, "sum").tolist()
    mean = total / count
    std = math.sqrt(max(squares / count - mean**2, 0.0))
    return {"reward_mean": mean, "reward_std": std, "reward_bias": -mean, "normalised_on": int(count)}
