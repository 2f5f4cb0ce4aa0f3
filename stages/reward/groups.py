"""Ranked comparisons as tokenized groups, bucketed into batches and packed into one forward pass.

One group is one prompt with its K ranked completions; it is one element of a batch, InstructGPT
style. `collate` packs the K rows of every group in a batch into one forward pass, so each completion is
forwarded once per step (K rows per group, not the 2 * C(K,2) of a pair expansion): right-padded rows, or
with `share_prompts` one padding-free row in which each group's prompt appears once (its K completions
attend to it), since the prompt is usually most of a row.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.chat import tokenize_completion
from pipeline.datasets import DataError
from pipeline.packed_attention import SharedPrefixRow
from pipeline.scoring import pad_right

# Markup that chat templates put around turns. Finding it inside a message means the record was rendered
# with some template already; rendering it again with ours would train on garbage.
TEMPLATE_MARKERS = {
    "<|im_start|>": "ChatML",
    "<|im_end|>": "ChatML",
    "<|start_header_id|>": "Llama 3",
    "<|eot_id|>": "Llama 3",
    "[INST]": "Llama 2 / Mistral",
    "<start_of_turn>": "Gemma",
    "<|user|>": "Zephyr / Phi",
    "<|assistant|>": "Zephyr / Phi",
}
# (Raw "Human: ... Assistant: ..." transcripts are not checked: they are plain text, and real replies in
# HH-RLHF and OpenAssistant quote such turns, even at their start.)


@dataclass
class Group:
    """One prompt's completions as token ids, with their ranks (lower is better) and the record's margin."""

    rows: list[list[int]]
    ranks: list[int]
    margin: float = 0.0

    @property
    def longest(self) -> int:
        return max(len(row) for row in self.rows)


@dataclass
class DataCounts:
    """What reading the data had to do: nothing here is dropped silently."""

    skipped_no_pairs: int = 0  # records with fewer than 2 distinct ranks (nothing to learn from)
    truncated_prompts: int = 0  # sequences whose prompt lost tokens on the left to fit max_length
    truncated_completions: int = 0  # sequences left with no prompt at all: the completion filled max_length
    dropped_invalid: int = 0  # invalid records the loader dropped (skip_invalid: true)

    def add(self, other: DataCounts, *, dropped_invalid: int = 0) -> None:
        self.skipped_no_pairs += other.skipped_no_pairs
        self.truncated_prompts += other.truncated_prompts
        self.truncated_completions += other.truncated_completions
        self.dropped_invalid += other.dropped_invalid + dropped_invalid


def template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """A readable name for the tokenizer's chat template, for error messages."""
    for marker, name in TEMPLATE_MARKERS.items():
        if marker in (tokenizer.chat_template or ""):
            return name
    return "a custom template" if tokenizer.chat_template else "no template"


def rendered_markup(record: dict[str, Any]) -> tuple[str, str, str] | None:
    """(field, marker, template) of the first chat-template marker in a record; None for plain messages."""
    key = "prompt" if "prompt" in record else "messages"
    texts = [(f"{key}[{i}].content", m["content"]) for i, m in enumerate(record.get(key, []))]
    texts += [(f"completions[{i}]", text) for i, text in enumerate(record.get("completions", []))]
    for where, text in texts:
        for marker, name in TEMPLATE_MARKERS.items():
            if marker in text:
                return where, marker, name
    return None


def check_plain_text(records: Sequence[dict[str, Any]], source: str, template_name: str) -> None:
    """Refuse records that were rendered with a chat template before they reached us."""
    for index, record in enumerate(records):
        found = rendered_markup(record)
        if found is not None:
            where, marker, rendered_by = found
            raise DataError(
                source,
                None,
                where,
                f"record {index + 1} already contains chat markup {marker!r} ({rendered_by}), "
                f"but the reward model renders plain messages with its own chat template ({template_name}). "
                "Give plain messages: load the source through its converter "
                "(data_format: hh-rlhf, oasst, trl, ...) instead of pre-rendered text",
            )


def tokenize_comparisons(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    max_length: int,
    *,
    use_margin: bool = False,
) -> tuple[list[Group], DataCounts]:
    """Tokenize each record's completions after its prompt; skip (and count) records with no ranked pair."""
    groups: list[Group] = []
    counts = DataCounts()
    for record in records:
        if len(set(record["ranks"])) < 2:
            counts.skipped_no_pairs += 1
            continue
        rows = []
        for completion in record["completions"]:
            tokens = tokenize_completion(tokenizer, record["prompt"], completion, max_length)
            rows.append(tokens.input_ids)
            counts.truncated_prompts += tokens.truncated
            counts.truncated_completions += tokens.prompt_length == 0 and tokens.truncated
        margin = float(record.get("margin", 0.0)) if use_margin else 0.0
        groups.append(Group(rows, list(record["ranks"]), margin))
    return groups, counts


def bucket_batches(groups: Sequence[Group], groups_per_batch: int, seed: int) -> list[list[Group]]:
    """Batches of `groups_per_batch` groups of similar length, so that a batch is not mostly padding.

    Groups are sorted by their longest row (which sets the padded width) with a seeded shuffle first, so
    that equal lengths are not always batched in file order; the training loader shuffles batch order.
    """
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: (groups[i].longest, sum(len(r) for r in groups[i].rows)))
    return [
        [groups[i] for i in order[at : at + groups_per_batch]]
        for at in range(0, len(order), groups_per_batch)
    ]


# The keys of a collated batch that are the scorer's inputs (pipeline.scoring.RewardScorer.forward).
MODEL_INPUTS = ("input_ids", "attention_mask", "shared_prefix")


def collate(batch: Sequence[Group], pad_id: int, *, share_prompts: bool = False) -> dict[str, Any]:
    """Every row of every group as one forward's input, with flat rank/group/margin vectors in row order.

    The input is a right-padded batch (`input_ids`, `attention_mask`), or with `share_prompts` a
    `shared_prefix` row: each group's common prefix once, then the rest of each of its rows.
    """
    flat = {
        "ranks": torch.tensor([rank for group in batch for rank in group.ranks], dtype=torch.long),
        "groups": torch.tensor([g for g, group in enumerate(batch) for _ in group.rows], dtype=torch.long),
        "margins": torch.tensor([group.margin for group in batch for _ in group.rows], dtype=torch.float32),
    }
    if share_prompts:
        return {"shared_prefix": SharedPrefixRow.of([group.rows for group in batch])} | flat
    input_ids, attention_mask = pad_right([row for group in batch for row in group.rows], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask} | flat


def batch_scores(scorer: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The scorer's score of every row of a collated batch, in row order."""
    return scorer(**{key: batch[key] for key in MODEL_INPUTS if key in batch})


def batch_for_step(step: int, num_batches: int, process: int, processes: int, seed: int) -> int:
    """The batch `process` trains on at optimizer step `step` (counted from 0 over the whole run).

    Each epoch is a seeded shuffle of all batches, dealt out to the processes in turn (wrapping to the start
    of the shuffle when they do not divide evenly). A pure function of the step: a resumed run needs no
    data-loader state to continue exactly where it stopped.
    """
    per_epoch = math.ceil(num_batches / processes)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(num_batches, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return int(order[(offset * processes + process) % num_batches])
