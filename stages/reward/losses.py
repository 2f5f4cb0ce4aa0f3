"""Ranking losses and metrics for a reward model, as pure functions over a packed batch of groups.

A batch packs every completion of every group (one prompt and its K ranked completions) into one flat
vector of scores, so each response is forwarded exactly once. Three flat vectors describe it:

    scores  (N,)  the reward model's score of each completion
    ranks   (N,)  its human rank; lower is better, equal ranks are a tie
    groups  (N,)  the index of its group within the batch, 0 .. G-1

Normalisation follows InstructGPT (Ouyang et al. 2022, eq. 1): the loss of a prompt is the mean over its
C(K,2) ranked pairs, and the batch loss is the mean over prompts. A prompt with many completions thus
weighs as much as one with two, instead of dominating the batch with its K(K-1)/2 pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Pairs:
    """Every ordered (better, worse) pair of a packed batch, as indices into its flat score vector."""

    better: Tensor  # (P,) index of the better-ranked completion
    worse: Tensor  # (P,) index of the worse-ranked completion
    group: Tensor  # (P,) the group both belong to


def ranked_pairs(ranks: Tensor, groups: Tensor) -> Pairs:
    """All pairs within a group whose ranks differ, better first; ties give no pair."""
    same_group = groups[:, None] == groups[None, :]
    better_than = ranks[:, None] < ranks[None, :]  # [i, j]: i is ranked above j
    better, worse = torch.nonzero(same_group & better_than, as_tuple=True)
    return Pairs(better, worse, groups[better])


def group_mean(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Mean of `values` within each group (0 for a group with no values), shape (num_groups,)."""
    totals = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)
    counts = torch.bincount(group, minlength=num_groups).to(values.dtype)
    return totals / counts.clamp(min=1)


def pairwise_loss(scores: Tensor, ranks: Tensor, groups: Tensor, margins: Tensor | None = None) -> Tensor:
    """InstructGPT's ranking loss: mean over groups of the mean over pairs of -log sigmoid(r_b - r_w - m).

    `margins` (one per completion, read from its group) is Llama 2's margin: the better completion must
    win by at least that much before the loss stops pushing.
    """
    pairs = ranked_pairs(ranks, groups)
    diff = scores[pairs.better] - scores[pairs.worse]
    if margins is not None:
        diff = diff - margins[pairs.better]
    per_pair = -F.logsigmoid(diff)
    num_groups = int(groups.max()) + 1
    has_pairs = torch.bincount(pairs.group, minlength=num_groups) > 0
    return group_mean(per_pair, pairs.group, num_groups)[has_pairs].mean()


def plackett_luce_loss(scores: Tensor, ranks: Tensor, groups: Tensor) -> Tensor:
    """Listwise loss: -log P(ranking) under Plackett-Luce, normalised per group, then averaged.

    P(ranking) = prod_i exp(r_i) / sum_{j ranked at or below i} exp(r_j). Ties follow Breslow's
    convention: tied completions share one choice set (each one's denominator holds its tied peers and
    everything ranked below), and completions in the worst rank of a group, which are chosen over
    nothing, add no term. With K = 2 and no tie this is exactly the pairwise loss.
    Each group's terms are averaged (K - 1 terms without ties), then groups are averaged.
    """
    same_group = groups[:, None] == groups[None, :]
    choice_set = same_group & (ranks[None, :] >= ranks[:, None])  # [i, j]: j competes when i is chosen
    beats_someone = (same_group & (ranks[None, :] > ranks[:, None])).any(dim=1)
    log_denominator = torch.logsumexp(scores[None, :].masked_fill(~choice_set, float("-inf")), dim=1)
    nll = (log_denominator - scores)[beats_someone]
    num_groups = int(groups.max()) + 1
    term_groups = groups[beats_someone]
    has_terms = torch.bincount(term_groups, minlength=num_groups) > 0
    return group_mean(nll, term_groups, num_groups)[has_terms].mean()


def kendall_tau_b(scores: Tensor, ranks: Tensor) -> float:
    """Kendall's tau-b between predicted scores and the human ranking of one group (1 = same order).

    Ranks are negated so that "higher score" and "better rank" point the same way; tau-b corrects for
    ties on either side. 0 when either side is all ties (no order to agree with).
    """
    s = scores[:, None] - scores[None, :]
    h = ranks[None, :] - ranks[:, None]  # positive when i is ranked above j
    upper = torch.triu(torch.ones_like(s, dtype=torch.bool), diagonal=1)
    s, h = torch.sign(s[upper]), torch.sign(h[upper])
    concordance = (s * h).sum()
    denominator = torch.sqrt((s != 0).sum().to(scores.dtype) * (h != 0).sum().to(scores.dtype))
    return float(concordance / denominator) if denominator > 0 else 0.0


def ranking_sums(scores: Tensor, ranks: Tensor, groups: Tensor) -> dict[str, float]:
    """Sums from which held-out metrics are built, so that shards on several processes can be added up.

    Keys: pairs, correct, margin (sum of r_better - r_worse), groups, tau (sum of per-group Kendall
    tau), and pairs_k{K} / correct_k{K} per group size K. A pair counts as correct only when the better
    completion scores strictly higher.
    """
    pairs = ranked_pairs(ranks, groups)
    diff = scores[pairs.better] - scores[pairs.worse]
    correct = diff > 0
    sums = {
        "pairs": float(len(diff)),
        "correct": float(correct.sum()),
        "margin": float(diff.sum()),
        "groups": 0.0,
        "tau": 0.0,
    }
    for g in torch.unique(groups).tolist():
        members = groups == g
        in_group = pairs.group == g
        if not in_group.any():
            continue
        k = int(members.sum())
        sums["groups"] += 1
        sums["tau"] += kendall_tau_b(scores[members], ranks[members])
        sums[f"pairs_k{k}"] = sums.get(f"pairs_k{k}", 0.0) + float(in_group.sum())
        sums[f"correct_k{k}"] = sums.get(f"correct_k{k}", 0.0) + float(correct[in_group].sum())
    return sums


def ranking_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Accuracy (pooled over pairs), accuracy per K, mean margin and mean Kendall tau from `ranking_sums`."""
    pairs = max(sums.get("pairs", 0.0), 1.0)
    metrics = {
        "accuracy": sums.get("correct", 0.0) / pairs,
        "margin": sums.get("margin", 0.0) / pairs,
        "kendall_tau": sums.get("tau", 0.0) / max(sums.get("groups", 0.0), 1.0),
    }
    sizes = sorted(int(key[len("pairs_k") :]) for key in sums if key.startswith("pairs_k"))
    for k in sizes:
        metrics[f"accuracy_k{k}"] = sums[f"correct_k{k}"] / sums[f"pairs_k{k}"]
    return metrics


def add_sums(total: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    for key, value in more.items():
        total[key] = total.get(key, 0.0) + value
    return total
