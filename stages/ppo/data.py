"""Where stage 3's data comes from: the training prompts, the held-out sets and their judge, and the seeded
order both the prompts and the PPO-ptx demonstrations are drawn in (`take`: a position of two integers, so a
checkpoint stores where the stream is without storing the stream)."""

from __future__ import annotations

from dataclasses import replace

import torch
from accelerate import Accelerator

from pipeline.chat import prompt_ids
from pipeline.data_sources import data_file
from pipeline.datasets import load_records
from pipeline.generation import SamplingSettings
from pipeline.scoring import load_reward
from pipeline.store import ArtifactStore
from stages.ppo.config import Config
from stages.ppo.evaluate import EvalSet, Evaluation


def load_prompts(
    source: str, tokenizer, cfg: Config, limit: int | None = None
) -> tuple[list[dict], list[list[int]]]:
    """Prompt records and their ids, cut to the last max_prompt_length tokens (the assistant header stays)."""
    records = load_records(source, "prompt", format=cfg.data_format, limit=limit).records
    return records, [prompt_ids(tokenizer, r["prompt"])[-cfg.max_prompt_length :] for r in records]


def with_data_files(cfg: Config, store: ArtifactStore) -> Config:
    """`cfg` with every data setting that names an artifact (`labels:latest`) resolved to its file, once."""
    eval_prompts = cfg.eval_prompts
    if isinstance(eval_prompts, dict):
        eval_prompts = {name: data_file(source, "prompt", store) for name, source in eval_prompts.items()}
    else:
        eval_prompts = data_file(eval_prompts, "prompt", store)
    return replace(
        cfg,
        prompts=data_file(cfg.prompts, "prompt", store),
        eval_prompts=eval_prompts,
        ptx_data=data_file(cfg.ptx_data, "conversation", store),
    )


def load_evaluation(
    cfg: Config, store: ArtifactStore, *, tokenizer, acc: Accelerator, engine
) -> Evaluation | None:
    """The held-out sets named by eval_prompts, and the judge named by eval_judge (None: no evaluation)."""
    if not cfg.eval_prompts:
        return None
    sources = {"": cfg.eval_prompts} if isinstance(cfg.eval_prompts, str) else cfg.eval_prompts
    sets = []
    for name, source in sources.items():
        records, ids = load_prompts(source, tokenizer, cfg, cfg.eval_limit)
        sets.append(EvalSet(name, [r["prompt"] for r in records], ids))
    settings = SamplingSettings(
        max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
        temperature=cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature,
    )
    judge = None
    if cfg.eval_judge:
        judge = load_reward(cfg.eval_judge, store)
        judge.scorer.to(acc.device)
    return Evaluation(sets, settings, cfg, acc, engine, tokenizer, judge)


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
