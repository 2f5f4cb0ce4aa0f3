"""Held-out evaluation: reward, KL to the reference, response length, and win rate over the SFT policy.

The policy and the SFT policy (the reference) answer the same prompts with a sampler seeded the same way
each time, so successive evaluations differ only by the policy; the reward model judges each pair. The
SFT side never changes, so its scores are computed once per run. KL is exact over the vocabulary at each
response position (not a one-sample estimate), summed over the response.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from stages.ppo import rl
from stages.ppo.models import Models
from stages.ppo.rollout import generation_weights, left_pad, response_logits, sample


@dataclass
class EvalSettings:
    max_new_tokens: int
    temperature: float
    """0 is greedy; the KL then compares the temperature-1 distributions along the greedy responses."""
    batch_size: int
    seed: int
    reward_clip: float
    missing_eos_penalty: float | None
    stop_ids: list[int]
    pad_id: int


@torch.no_grad()
def evaluate(
    models: Models,
    prompts: list[list[int]],
    how: EvalSettings,
    acc: Accelerator,
    sft_scores: dict[int, float],
) -> dict[str, float]:
    """Mean eval/score, eval/kl, eval/length and eval/win over `prompts` (each process takes its share)."""
    mine = list(range(len(prompts)))[acc.process_index :: acc.num_processes]
    seed = how.seed + 7919 * (acc.process_index + 1)
    policy_gen = torch.Generator(acc.device).manual_seed(seed)
    sft_gen = torch.Generator(acc.device).manual_seed(seed)
    settings = dict(
        max_new_tokens=how.max_new_tokens,
        temperature=how.temperature,
        stop_ids=how.stop_ids,
        pad_id=how.pad_id,
    )
    kl_temperature = how.temperature or 1.0
    rows = []
    for start in range(0, len(mine), how.batch_size):
        chunk = mine[start : start + how.batch_size]
        query, query_mask = left_pad([prompts[i] for i in chunk], how.pad_id, acc.device)
        with generation_weights(models.policy_model) as decoder:
            seq = sample(decoder, query, query_mask, generator=policy_gen, **settings)
        logits = response_logits(models.policy_model, seq) / kl_temperature
        with models.as_reference() as reference:
            ref_logits = response_logits(reference, seq) / kl_temperature
            if chunk[0] not in sft_scores:
                sft_seq = sample(reference, query, query_mask, generator=sft_gen, **settings)
                sft = models.score(sft_seq, how.reward_clip, how.missing_eos_penalty)
                sft_scores.update(zip(chunk, sft.tolist(), strict=True))
        kl = (rl.kl_from_logits(logits, ref_logits) * seq.response_mask).sum(-1)
        scores = models.score(seq, how.reward_clip, how.missing_eos_penalty)
        for j, i in enumerate(chunk):
            ours, theirs = scores[j].item(), sft_scores[i]
            win = 1.0 if ours > theirs else 0.5 if ours == theirs else 0.0
            rows.append(
                {"score": ours, "kl": kl[j].item(), "length": seq.response_mask[j].sum().item(), "win": win}
            )
    rows = gather_object(rows)
    return {
        f"eval/{key}": sum(r[key] for r in rows) / max(len(rows), 1)
        for key in ("score", "kl", "length", "win")
    }
