"""Held-out evaluation: reward, KL to the reference, response length, and win rate over the SFT policy.

The policy and the SFT policy (the reference) answer the same prompts through the same rollout engine,
with a sampler seeded the same way each time, so successive evaluations differ only by the policy; the
reward model judges each pair. The SFT side never changes, so its scores are computed once per run. KL
is exact over the vocabulary at each response position (not a one-sample estimate), summed over the
response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from pipeline.generation import Engine, SamplingSettings, Sequences
from stages.ppo import rl
from stages.ppo.config import Config
from stages.ppo.critic import Critic
from stages.ppo.passes import Shared
from stages.ppo.policy import Policy


@dataclass
class Evaluation:
    """One run's held-out prompts, how to sample them, and the SFT policy's scores once known."""

    prompts: list[list[int]]
    settings: SamplingSettings
    """Temperature 0 is greedy; the KL then compares the temperature-1 distributions along the replies."""
    cfg: Config
    acc: Accelerator
    engine: Engine
    sft_scores: dict[int, float] = field(default_factory=dict)

    @classmethod
    def of(cls, prompts: list[list[int]], cfg: Config, acc: Accelerator, engine: Engine) -> Evaluation | None:
        if not prompts:
            return None
        temperature = cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature
        settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=temperature)
        return cls(prompts, settings, cfg, acc, engine)

    @torch.no_grad()
    def run(self, policy: Policy, critic: Critic) -> dict[str, float]:
        """Mean eval/score, eval/kl, eval/length and eval/win (each process takes its share of prompts)."""
        acc, cfg = self.acc, self.cfg
        mine = list(range(len(self.prompts)))[acc.process_index :: acc.num_processes]
        chunks = [mine[i : i + cfg.eval_batch_size] for i in range(0, len(mine), cfg.eval_batch_size)]
        if any(i not in self.sft_scores for i in mine):
            with policy.as_reference() as reference:
                self.engine.sync(reference)
                for chunk, seq in zip(chunks, self.sample(chunks), strict=True):
                    self.sft_scores.update(zip(chunk, self.scores(critic, seq).tolist(), strict=True))
            self.engine.sync(policy.lm)
        kl_temperature = self.settings.temperature or 1.0
        rows = []
        for chunk, seq in zip(chunks, self.sample(chunks), strict=True):
            logits = policy.current_logits(seq) / kl_temperature
            ref_logits = policy.reference_logits(seq, Shared()) / kl_temperature
            kl = (rl.kl_from_logits(logits, ref_logits) * seq.response_mask).sum(-1)
            scores = self.scores(critic, seq)
            for j, i in enumerate(chunk):
                ours, theirs = scores[j].item(), self.sft_scores[i]
                win = 1.0 if ours > theirs else 0.5 if ours == theirs else 0.0
                length = seq.response_mask[j].sum().item()
                rows.append({"score": ours, "kl": kl[j].item(), "length": length, "win": win})
        rows = gather_object(rows)
        return {
            f"eval/{key}": sum(r[key] for r in rows) / max(len(rows), 1)
            for key in ("score", "kl", "length", "win")
        }

    def sample(self, chunks: list[list[int]]) -> list[Sequences]:
        """Responses to each chunk of prompts from the engine's current weights, seeded the same each time."""
        seed = self.cfg.seed + 7919 * (self.acc.process_index + 1)
        generator = torch.Generator(self.acc.device).manual_seed(seed)
        return [
            self.engine.sample([self.prompts[i] for i in chunk], self.settings, generator) for chunk in chunks
        ]

    def scores(self, critic: Critic, seq: Sequences) -> torch.Tensor:
        raw = critic.scores(seq, critic.prepare(seq))
        return rl.clip_and_penalise(
            raw, seq.ended, clip=self.cfg.reward_clip, missing_stop_penalty=self.cfg.missing_eos_penalty
        )
