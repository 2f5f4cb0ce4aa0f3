"""Agreement between annotators: pairwise agreement and Kendall's tau-b against hand-computed values."""

from __future__ import annotations

import math

import pytest

from pipeline.app.agreement import agreement_summary, kendall_tau_b, pair_agreement


def test_pair_agreement_counts_ties_as_a_way_round():
    # Pairs (0,1) (0,2) (1,2): a ties 0 and 1, b orders them -> disagree; the other two agree.
    assert pair_agreement([0, 0, 1], [0, 1, 2]) == (2, 3)
    assert pair_agreement([0, 0, 1], [1, 1, 2]) == (3, 3)  # both tie the first two
    assert pair_agreement([1, 0], [0, 1]) == (0, 1)


def test_kendall_tau_b_by_hand():
    # a = [0, 0, 1], b = [0, 1, 2]: concordant (0,2) (1,2) = 2, discordant 0, ties in a 1, in b 0, P = 3.
    assert kendall_tau_b([0, 0, 1], [0, 1, 2]) == pytest.approx(2 / math.sqrt((3 - 1) * 3))
    assert kendall_tau_b([0, 1, 2, 3], [3, 2, 1, 0]) == pytest.approx(-1.0)
    # [0, 2, 1, 3] vs [0, 1, 2, 3]: one discordant pair (1,2) of six: (5 - 1) / 6.
    assert kendall_tau_b([0, 2, 1, 3], [0, 1, 2, 3]) == pytest.approx(4 / 6)
    assert kendall_tau_b([1, 1, 1], [0, 1, 2]) is None  # everything tied: undefined


def test_summary_pools_pairs_and_averages_tau_over_annotator_pairs():
    rankings = {
        1: {"ann": [0, 0, 1], "ben": [0, 1, 2]},  # agreement 2/3, tau 0.8165
        2: {"ann": [1, 0], "ben": [0, 1]},  # agreement 0/1, tau -1
        3: {"ann": [0, 1]},  # one annotator: not counted
    }
    summary = agreement_summary(rankings)
    assert summary["items"] == 2 and summary["annotator_pairs"] == 2
    assert summary["pairwise_agreement"] == pytest.approx(2 / 4)
    assert summary["kendall_tau"] == pytest.approx((2 / math.sqrt(6) - 1) / 2)
    assert summary["per_annotator"] == {"ann": pytest.approx(0.5), "ben": pytest.approx(0.5)}
    assert agreement_summary({1: {"ann": [0, 1]}})["pairwise_agreement"] is None
