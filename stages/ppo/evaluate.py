"""Held-out evaluation: reward, KL to the reference, reply length, and win rate over the SFT policy.

The policy and the SFT policy (the reference) answer the same prompts through the same rollout engine,
with samplers seeded the same way each time, so successive evaluations differ only by the policy. Two
reward models judge each pair: the proxy (the reward PPO optimises) and, when `eval_judge` names one, a
judge trained on other data, which reads the replies as text with its own tokenizer. The proxy's win
rate rising while the judge's stalls or falls is reward over-optimisation (Gao et al. 2022): the gap is
logged as eval/win_gap. The SFT side never changes, so its replies and scores are computed once per run.
KL is exact over the vocabulary at each response position (not a one-sample estimate), summed over the
response. eval/no_stop is the share of replies cut off at the length limit: the proxy takes the
missing-stop penalty off them, so a win rate bought by finishing (or not finishing) replies shows there.
Each prompt set is reported on its own; a single unnamed set as eval/<metric>.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase

from pipeline.chat import Message
from pipeline.generation import Engine, SamplingSettings, Sequences
from pipeline.scoring import LoadedRewardModel
from stages.ppo import rl
from stages.ppo.config import Config
from stages.ppo.critic import Critic
from stages.ppo.policy import Policy

PAIRS_PER_SET = 5
"""Prompts of each set whose two replies (policy and SFT) the artifact keeps, side by side."""


@dataclass
class EvalSet:
    """One named set of held-out prompts, as messages and as token ids."""

    name: str
    """"" for a single unnamed set (metrics eval/<metric>), else eval/<name>/<metric>."""
    messages: list[list[Message]]
    ids: list[list[int]]

    @property
    def prefix(self) -> str:
        return f"eval/{self.name}/" if self.name else "eval/"


@dataclass
class Reply:
    """One side's reply to one prompt, and what the reward models make of it."""

    text: str
    proxy: float
    judge: float | None
    kl: float
    """Summed over the reply, to the SFT policy (0 for the SFT policy's own)."""
    length: int
    """Tokens."""
    ended: bool
    """Whether the reply ended with a stop token (not cut off at the length limit)."""

    def shown(self) -> dict:
        """What the artifact keeps of a reply beside the other side's."""
        return {"text": self.text, "proxy": self.proxy, "judge": self.judge}


@dataclass
class Evaluation:
    """A run's held-out sets, how to sample them, and the SFT policy's replies once known."""

    sets: list[EvalSet]
    settings: SamplingSettings
    """Temperature 0 is greedy; the KL then compares the temperature-1 distributions along the replies."""
    cfg: Config
    acc: Accelerator
    engine: Engine
    tokenizer: PreTrainedTokenizerBase
    judge: LoadedRewardModel | None = None
    sft: dict[tuple[str, int, int], Reply] = field(default_factory=dict)
    """(set, prompt, sample) -> the SFT policy's reply."""
    pairs: list[dict] = field(default_factory=list)
    """From the last evaluation: the first prompts of each set with both replies (main process)."""

    @torch.no_grad()
    def baseline(self, policy: Policy, critic: Critic) -> dict[str, float]:
        """Step 0's metrics without a second generation: before its first update the policy is the SFT
        policy (same weights, same seeds), so its replies are the SFT replies, at KL 0 and a win rate of
        0.5 by definition."""
        self.answer_as_sft(policy, critic)
        metrics: dict[str, float] = {}
        for eval_set in self.sets:
            rows = []
            for (name, i, _), reply in self.sft.items():
                if name == eval_set.name:
                    rows.append(compared(i, reply, reply, judged=self.judge is not None))
            metrics |= {eval_set.prefix + key: value for key, value in summarise(gather_object(rows)).items()}
        return metrics

    def answer_as_sft(self, policy: Policy, critic: Critic) -> None:
        """The SFT policy's replies, once per run: they never change."""
        if self.sft:
            return
        with policy.as_reference() as reference:
            self.engine.sync(reference)
            for eval_set in self.sets:
                for (i, sample), reply in self.answer(eval_set, critic, policy=None):
                    self.sft[(eval_set.name, i, sample)] = reply
        self.engine.sync(policy.lm)

    @torch.no_grad()
    def run(self, policy: Policy, critic: Critic) -> dict[str, float]:
        """Each set's metrics (each process takes its share of the prompts)."""
        self.answer_as_sft(policy, critic)
        metrics: dict[str, float] = {}
        self.pairs = []
        for eval_set in self.sets:
            rows = []
            for (i, sample), ours in self.answer(eval_set, critic, policy=policy):
                theirs = self.sft[(eval_set.name, i, sample)]
                row = compared(i, ours, theirs, judged=self.judge is not None)
                if sample == 0 and i < PAIRS_PER_SET:
                    row["pair"] = {"set": eval_set.name, "prompt": eval_set.messages[i], "policy": ours.shown(),
                                   "sft": theirs.shown()}  # fmt: skip
                rows.append(row)
            rows = gather_object(rows)
            self.pairs += sorted((r.pop("pair") for r in rows if "pair" in r), key=lambda p: str(p["prompt"]))
            metrics |= {eval_set.prefix + key: value for key, value in summarise(rows).items()}
        return metrics

    def answer(self, eval_set: EvalSet, critic: Critic, policy: Policy | None):
        """((prompt, sample), Reply) for this process's prompts, from the engine's current
        weights (the policy's, or the reference's when `policy` is None), seeded the same every time."""
        acc, cfg = self.acc, self.cfg
        mine = list(range(len(eval_set.ids)))[acc.process_index :: acc.num_processes]
        seed = cfg.seed + 7919 * (acc.process_index + 1) + sum(map(ord, eval_set.name))
        generator = torch.Generator(acc.device).manual_seed(seed)
        kl_temperature = self.settings.temperature or 1.0
        for sample in range(cfg.eval_samples):
            for start in range(0, len(mine), cfg.eval_batch_size):
                chunk = mine[start : start + cfg.eval_batch_size]
                seq = self.engine.sample([eval_set.ids[i] for i in chunk], self.settings, generator)
                proxy = self.proxy_scores(critic, seq).tolist()
                kl = [0.0] * len(chunk)
                if policy is not None:
                    shared = policy.prepare(seq)  # the bottom layers the two share, run once
                    logits = policy.current_logits(seq, shared) / kl_temperature
                    ref_logits = policy.reference_logits(seq, shared) / kl_temperature
                    kl = (rl.kl_from_logits(logits, ref_logits) * seq.response_mask).sum(-1).tolist()
                for j, i in enumerate(chunk):
                    length = int(seq.response_mask[j].sum())
                    text = self.tokenizer.decode(seq.response[j, :length], skip_special_tokens=True).strip()
                    judged = None if self.judge is None else self.judge_score(eval_set.messages[i], text)
                    reply = Reply(text=text, proxy=proxy[j], judge=judged, kl=kl[j], length=length,
                                  ended=bool(seq.ended[j]))  # fmt: skip
                    yield (i, sample), reply

    def proxy_scores(self, critic: Critic, seq: Sequences) -> torch.Tensor:
        raw = critic.scores(seq, critic.prepare(seq))
        return rl.clip_and_penalise(
            raw, seq.ended, clip=self.cfg.reward_clip, missing_stop_penalty=self.cfg.missing_eos_penalty
        )

    def judge_score(self, prompt: list[Message], text: str) -> float:
        (raw,) = self.judge.score(prompt, [text])
        return self.judge.normalise(raw)


def compared(prompt: int, ours: Reply, theirs: Reply, *, judged: bool) -> dict[str, float]:
    """One row of an evaluation: our reply's measures, and whether it beat the SFT reply to the same
    prompt and sample (the SFT reply against itself: KL 0, a win of 0.5)."""
    row = {"prompt": prompt, "score": ours.proxy, "kl": ours.kl, "length": ours.length,
           "words": len(ours.text.split()), "no_stop": float(not ours.ended),
           "win": win(ours.proxy, theirs.proxy)}  # fmt: skip
    if judged:
        row |= {"judge_score": ours.judge, "judge_win": win(ours.judge, theirs.judge)}
    return row


def win(ours: float, theirs: float) -> float:
    return 1.0 if ours > theirs else 0.5 if ours == theirs else 0.0


def summarise(rows: list[dict]) -> dict[str, float]:
    """Means over every reply, and the win rates' 95% intervals over prompts (samples of a prompt averaged
    first: they are not independent of each other)."""
    out = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0] if key != "prompt"}
    for key in ("win", "judge_win"):
        if key in out:
            out[f"{key}_ci"] = interval([r[key] for r in rows], [r["prompt"] for r in rows])
    if "judge_win" in out:
        out["win_gap"] = out["win"] - out["judge_win"]
    return out


def interval(values: list[float], groups: list[int]) -> float:
    """Half-width of the normal 95% interval of the mean of per-group means."""
    by_group: dict[int, list[float]] = {}
    for value, group in zip(values, groups, strict=True):
        by_group.setdefault(group, []).append(value)
    means = [sum(v) / len(v) for v in by_group.values()]
    if len(means) < 2:
        return math.nan
    return 1.96 * statistics.stdev(means) / math.sqrt(len(means))
