"""A length-aware normaliser for the reward: what the reward model says beyond how long the reply is.

Reward models learn length preferences from their comparisons, in either direction (Singhal et al. 2023,
"A Long Way to Go"): PPO then buys reward by making replies shorter or longer instead of better. Measured
here (bench/RESULTS.md, "PPO on prompts nobody tuned to"): on the SFT policy's replies to general
instructions, one HH reward model's score correlates with reply length at -0.76, another's at +0.45, and
PPO against the first cut the replies from ~90 tokens to ~27.

`length_correction: linear` fits, before the first step, the proxy's standardised score against reply
length by least squares on the SFT policy's finished replies to `length_calibration` training prompts,
and from then on subtracts slope x (length - their mean length) from the score of every finished reply.
A reply cut off by `max_new_tokens` is left as scored: corrected by its cut length, a reward model that
dislikes long replies would pay a bonus for running into the limit (measured: with every reply
corrected, PPO drove half its replies into the limit). On the SFT policy's own
replies the corrected score has no linear dependence on length, so the policy gains only by what else
the reward model sees. The fit is made once, saved in the checkpoints (a resume uses the same one) and
recorded in the artifact's metrics.

The values get the same correction. The value model starts as the reward model (InstructGPT), so its
value of a half-written reply carries the same trend; `LengthCorrected` subtracts the trend at the
prefix's length from each value, so that values and corrected scores are in the same units from the
first step, and the value model learns the rest. (Where GAE's lambda is below 1, the advantage of a
token far from the end is mostly the values' differences, not the score: with lambda 0.95 and ~80-token
replies, replies shrank to ~25 tokens with the scores, and the values too, corrected.
configs/ppo-quality.yaml therefore sets lam: 1.)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn

from pipeline.generation import Engine, SamplingSettings, Sequences
from stages.ppo.config import Config
from stages.ppo.critic import Critic
from stages.ppo.passes import Shared


@dataclass(frozen=True)
class LengthFit:
    """score ~ intercept + slope x length over the calibration replies."""

    slope: float
    """Standardised score per response token."""
    mean_length: float
    """The calibration replies' mean length in tokens: a reply this long is not corrected."""
    correlation: float
    """Pearson correlation of score and length over the calibration replies (how much length explained)."""
    replies: int

    def corrected(self, scores: Tensor, lengths: Tensor) -> Tensor:
        """`scores` without the fitted length trend, for replies of `lengths` tokens (shapes broadcast)."""
        return scores - self.slope * (lengths.to(scores.dtype) - self.mean_length)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_length(lengths: list[float], scores: list[float]) -> LengthFit:
    """Least-squares slope of `scores` on `lengths` (0 when every length is the same)."""
    n = len(lengths)
    if n < 2:
        raise ValueError(f"a length fit needs at least 2 replies, got {n}")
    mean_length, mean_score = sum(lengths) / n, sum(scores) / n
    sxx = sum((x - mean_length) ** 2 for x in lengths)
    syy = sum((y - mean_score) ** 2 for y in scores)
    sxy = sum((x - mean_length) * (y - mean_score) for x, y in zip(lengths, scores, strict=True))
    slope = sxy / sxx if sxx > 0 else 0.0
    correlation = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0
    return LengthFit(slope=slope, mean_length=mean_length, correlation=correlation, replies=n)


@torch.no_grad()
def calibrate(
    prompts: list[list[int]], *, engine: Engine, critic: Critic, cfg: Config, acc: Accelerator
) -> LengthFit:
    """Sample the policy (still the SFT model) on `prompts`, score the replies, fit score against the length
    of those that finished, and say what was found.

    The sampler has a generator of its own, so the run's rollouts are the same with or without the fit.
    Each process samples its share; the fit is made on all of them, so every process applies the same one.
    """
    tick = time.perf_counter()
    settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    generator = torch.Generator(acc.device).manual_seed(cfg.seed * 1000 + 997 + acc.process_index)
    mine = prompts[acc.process_index :: acc.num_processes]
    finished: list[tuple[float, float]] = []
    for start in range(0, len(mine), cfg.eval_batch_size):
        seq = engine.sample(mine[start : start + cfg.eval_batch_size], settings, generator)
        scores = critic.scores(seq, critic.prepare(seq))
        lengths = seq.response_mask.sum(-1)
        finished += [
            (n, s)
            for n, s, ended in zip(lengths.tolist(), scores.tolist(), seq.ended.tolist(), strict=True)
            if ended
        ]
    pairs = gather_object(finished)
    if len(pairs) < 2:
        raise ValueError(
            f"only {len(pairs)} of the {len(prompts)} calibration replies ended within max_new_tokens, too few to "
            "fit a length trend: raise max_new_tokens or length_calibration"
        )
    fit = fit_length([length for length, _ in pairs], [score for _, score in pairs])
    acc.print(
        f"length correction: the reward model's score moves {fit.slope:+.4f} per reply token (correlation "
        f"{fit.correlation:+.2f} over the {fit.replies} of {len(prompts)} SFT replies that finished, "
        f"mean length {fit.mean_length:.1f}); subtracted from every finished reply's score "
        f"({time.perf_counter() - tick:.0f} s)"
    )
    return fit


class LengthCorrected:
    """A critic whose scores and values have the fitted length trend taken out (the module doc says why).

    The reply's length for a score; for the value before response token j, the j tokens written so far.
    """

    def __init__(self, critic: Critic, fit: LengthFit):
        self.critic = critic
        self.fit = fit

    @property
    def net(self) -> nn.Module:
        return self.critic.net

    def prepare(self, seq: Sequences) -> Shared:
        return self.critic.prepare(seq)

    def values(self, seq: Sequences, shared: Shared) -> Tensor:
        written = torch.arange(seq.response.shape[1], device=seq.response.device)
        return self.fit.corrected(self.critic.values(seq, shared), written)

    def scores(self, seq: Sequences, shared: Shared) -> Tensor:
        # A reply cut off by max_new_tokens has no length of its own: corrected as if of the mean length.
        lengths = seq.response_mask.sum(-1)
        lengths = torch.where(seq.ended, lengths, torch.full_like(lengths, self.fit.mean_length))
        return self.fit.corrected(self.critic.scores(seq, shared), lengths)

    def prepared(self, net: nn.Module) -> LengthCorrected:
        return LengthCorrected(self.critic.prepared(net), self.fit)

    def save(self, folder: Path, *, base: str, adapter: bool) -> None:
        self.critic.save(folder, base=base, adapter=adapter)
