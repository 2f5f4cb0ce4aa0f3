"""The reward model's ranking losses and metrics against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from stages.reward.losses import (
    kendall_tau_b,
    pairwise_loss,
    plackett_luce_loss,
    ranked_pairs,
    ranking_metrics,
    ranking_sums,
)


def softplus(x: float) -> float:
    """-log sigmoid(d) = softplus(-d) = log(1 + exp(-d))."""
    return math.log1p(math.exp(x))


def nll_pair(better: float, worse: float, margin: float = 0.0) -> float:
    return softplus(-(better - worse - margin))


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def test_k2_is_the_chosen_rejected_loss():
    loss = pairwise_loss(t([1.0, 0.0]), ids([0, 1]), ids([0, 0]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))  # 0.3133


def test_k3_averages_the_three_pairs():
    loss = pairwise_loss(t([2.0, 1.0, 0.0]), ids([0, 1, 2]), ids([0, 0, 0]))
    expected = (nll_pair(2, 1) + nll_pair(2, 0) + nll_pair(1, 0)) / 3
    assert loss.item() == pytest.approx(expected)


def test_k4_with_a_tie_skips_the_tied_pair():
    # Ranks 0, 1, 1, 2: five pairs (the two completions ranked 1 form none).
    scores = [0.5, 1.5, -1.0, 0.0]
    loss = pairwise_loss(t(scores), ids([0, 1, 1, 2]), ids([0, 0, 0, 0]))
    pairs = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    expected = sum(nll_pair(scores[b], scores[w]) for b, w in pairs) / 5
    assert loss.item() == pytest.approx(expected)
    assert expected == pytest.approx(0.700685, abs=1e-6)


def test_order_of_completions_does_not_matter():
    scores, ranks = [0.5, 1.5, -1.0, 0.0], [0, 1, 1, 2]
    perm = [2, 0, 3, 1]
    a = pairwise_loss(t(scores), ids(ranks), ids([0] * 4))
    b = pairwise_loss(t([scores[i] for i in perm]), ids([ranks[i] for i in perm]), ids([0] * 4))
    assert a.item() == pytest.approx(b.item())


def test_loss_is_averaged_per_prompt_then_over_prompts():
    # A K=2 group and a K=3 group: InstructGPT weighs each prompt once, not each of its pairs.
    scores = t([1.0, 0.0, 2.0, 1.0, 0.0])
    loss = pairwise_loss(scores, ids([0, 1, 0, 1, 2]), ids([0, 0, 1, 1, 1]))
    k2 = nll_pair(1, 0)
    k3 = (nll_pair(2, 1) + nll_pair(2, 0) + nll_pair(1, 0)) / 3
    assert loss.item() == pytest.approx((k2 + k3) / 2)
    pooled = (k2 + 3 * k3) / 4
    assert loss.item() != pytest.approx(pooled)


def test_margin_is_subtracted_from_every_pair_of_its_group():
    margins = t([0.5, 0.5, 0.0, 0.0])
    loss = pairwise_loss(t([1.0, 0.0, 1.0, 0.0]), ids([0, 1, 0, 1]), ids([0, 0, 1, 1]), margins)
    assert loss.item() == pytest.approx((nll_pair(1, 0, 0.5) + nll_pair(1, 0)) / 2)


def test_gradient_pushes_the_better_completion_up():
    scores = t([0.0, 0.0, 0.0]).requires_grad_()
    pairwise_loss(scores, ids([2, 0, 1]), ids([0, 0, 0])).backward()
    grad = scores.grad.tolist()
    assert grad[1] < 0 < grad[0]  # best goes up, worst goes down (gradient descent)
    assert grad[2] == pytest.approx(0.0)  # the middle one wins once and loses once


def test_plackett_luce_k3_by_hand():
    loss = plackett_luce_loss(t([2.0, 1.0, 0.0]), ids([0, 1, 2]), ids([0, 0, 0]))
    first = math.log(math.exp(2) + math.exp(1) + 1) - 2
    second = math.log(math.exp(1) + 1) - 1
    assert loss.item() == pytest.approx((first + second) / 2)
    assert loss.item() == pytest.approx(0.360434, abs=1e-6)


def test_plackett_luce_equals_pairwise_for_pairs():
    scores, ranks, groups = t([0.3, -0.2, 1.0, 2.0]), ids([0, 1, 1, 0]), ids([0, 0, 1, 1])
    assert plackett_luce_loss(scores, ranks, groups).item() == pytest.approx(
        pairwise_loss(scores, ranks, groups).item()
    )


def test_plackett_luce_ties_share_a_choice_set():
    # Ranks 0, 1, 1, 2 (Breslow): each tied completion competes against its peer and everything below.
    s = [0.0, 1.0, 2.0, 3.0]
    loss = plackett_luce_loss(t(s), ids([0, 1, 1, 2]), ids([0, 0, 0, 0]))
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    terms = [lse(s) - s[0], lse(s[1:]) - s[1], lse(s[1:]) - s[2]]  # the worst completion adds no term
    assert loss.item() == pytest.approx(sum(terms) / 3)


def test_plackett_luce_tie_at_the_bottom_adds_no_term():
    loss = plackett_luce_loss(t([1.0, 0.0, 2.0]), ids([0, 1, 1]), ids([0, 0, 0]))
    assert loss.item() == pytest.approx(math.log(math.exp(1) + 1 + math.exp(2)) - 1)


def test_ranked_pairs_lists_better_first():
    pairs = ranked_pairs(ids([1, 0, 1, 0]), ids([0, 0, 1, 1]))
    assert sorted(zip(pairs.better.tolist(), pairs.worse.tolist(), strict=True)) == [(1, 0), (3, 2)]
    assert sorted(pairs.group.tolist()) == [0, 1]


def test_kendall_tau_b():
    assert kendall_tau_b(t([3, 2, 1]), ids([0, 1, 2])) == pytest.approx(1.0)
    assert kendall_tau_b(t([1, 2, 3]), ids([0, 1, 2])) == pytest.approx(-1.0)
    # One tie in the human ranking: 2 concordant pairs out of 3 score pairs and 2 ranked pairs.
    assert kendall_tau_b(t([3, 2, 1]), ids([0, 1, 1])) == pytest.approx(2 / math.sqrt(6))
    assert kendall_tau_b(t([1, 1, 1]), ids([0, 1, 2])) == 0.0


def test_ranking_metrics_pool_pairs_and_split_by_k():
    # Group 0 (K=2) right; group 1 (K=3): pairs (0>1) right, (0>2) right, (1>2) wrong.
    scores = t([1.0, 0.0, 3.0, 1.0, 2.0])
    sums = ranking_sums(scores, ids([0, 1, 0, 1, 2]), ids([0, 0, 1, 1, 1]))
    metrics = ranking_metrics(sums)
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert metrics["accuracy_k2"] == pytest.approx(1.0)
    assert metrics["accuracy_k3"] == pytest.approx(2 / 3)
    assert metrics["margin"] == pytest.approx((1 + 2 + 1 - 1) / 4)
    assert metrics["kendall_tau"] == pytest.approx((1 + 1 / 3) / 2)
