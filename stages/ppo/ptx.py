"""PPO-ptx (InstructGPT): the policy also keeps `ptx_coef` x the language-model loss on demonstrations, so
that it does not forget how its SFT data reads while it chases the reward."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from pipeline.chat import tokenize_conversation
from pipeline.datasets import load_records
from pipeline.generation import position_ids
from stages.ppo.config import Config
from stages.ppo.data import take
from stages.ppo.policy import Policy


def load_demonstrations(cfg: Config, tokenizer) -> list[tuple[list[int], list[int]]]:
    """PPO-ptx demonstrations as (ids, assistant mask); those with no assistant token left are dropped."""
    records = load_records(cfg.ptx_data, "conversation").records
    tokenized = [tokenize_conversation(tokenizer, r["messages"], cfg.ptx_max_length) for r in records]
    return [(t.input_ids, t.assistant_mask) for t in tokenized if any(t.assistant_mask)]


def ptx_backward(
    ppo_loss: Tensor,
    policy: Policy,
    *,
    acc: Accelerator,
    cfg: Config,
    demonstrations: list,
    position: list[int],
    pad_id: int,
) -> float:
    """PPO-ptx: add ptx_coef x the LM loss on demonstrations; one gradient all-reduce for both."""
    with acc.no_sync(policy.net):
        acc.backward(ppo_loss)
    picked = take(len(demonstrations), cfg.ptx_batch_size * acc.num_processes, position, cfg.seed)
    rows = [demonstrations[i] for i in picked[acc.process_index :: acc.num_processes]]
    lm = ptx_loss(policy.lm, rows, pad_id, acc.device)
    acc.backward(cfg.ptx_coef * lm)
    return lm.item()


def ptx_loss(lm: nn.Module, rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> Tensor:
    """Mean next-token cross-entropy on the assistant tokens of right-padded demonstrations."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, trained) in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        labels[i, : len(row)] = torch.tensor([t if m else -100 for t, m in zip(row, trained, strict=True)])
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
