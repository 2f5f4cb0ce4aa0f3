"""Agreement between annotators who ranked the same task: the Admin tab's and the export's figures.

Both measures compare two rankings of the same K completions (ranks, lower is better, equal is a tie):

- pairwise agreement: the share of the K(K-1)/2 completion pairs the two put the same way round
  (both tied counts as the same way): 1 is full agreement;
- Kendall's tau-b: (concordant - discordant) / sqrt((P - ties_a) (P - ties_b)) over the P pairs, which
  corrects for ties; 1 is the same order, -1 the reverse, 0 no relation. Undefined (None) when either
  annotator tied everything.

Over a database, every pair of annotators on every task with two or more rankings counts once: the
agreement is pooled over their completion pairs, tau averaged over the annotator pairs where defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def pair_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(pairs put the same way round, pairs compared) for two rankings of the same completions."""
    if len(a) != len(b):
        raise ValueError(f"rankings of {len(a)} and {len(b)} completions")
    pairs = list(combinations(range(len(a)), 2))
    same = sum(_sign(a[i] - a[j]) == _sign(b[i] - b[j]) for i, j in pairs)
    return same, len(pairs)


def kendall_tau_b(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Kendall's tau-b of two rankings; None when either ties every completion."""
    if len(a) != len(b):
        raise ValueError(f"rankings of {len(a)} and {len(b)} completions")
    concordant = discordant = ties_a = ties_b = 0
    for i, j in combinations(range(len(a)), 2):
        product = _sign(a[i] - a[j]) * _sign(b[i] - b[j])
        concordant += product > 0
        discordant += product < 0
        ties_a += a[i] == a[j]
        ties_b += b[i] == b[j]
    pairs = len(a) * (len(a) - 1) // 2
    denominator = math.sqrt((pairs - ties_a) * (pairs - ties_b))
    return None if denominator == 0 else (concordant - discordant) / denominator


def agreement_summary(rankings: Mapping[Any, Mapping[str, Sequence[int]]]) -> dict[str, Any]:
    """Agreement over tasks labelled by more than one annotator.

    `rankings`: task -> {annotator: ranks}. Returns the number of such tasks and annotator pairs,
    pooled pairwise agreement, mean tau-b, and per annotator their pooled agreement with the others.
    """
    same = compared = 0
    taus: list[float] = []
    per_annotator: dict[str, list[int]] = {}
    items = pairs = 0
    for by_annotator in rankings.values():
        if len(by_annotator) < 2:
            continue
        items += 1
        for (name_a, a), (name_b, b) in combinations(sorted(by_annotator.items()), 2):
            pairs += 1
            agreed, total = pair_agreement(a, b)
            same, compared = same + agreed, compared + total
            for name in (name_a, name_b):
                tally = per_annotator.setdefault(name, [0, 0])
                tally[0] += agreed
                tally[1] += total
            tau = kendall_tau_b(a, b)
            if tau is not None:
                taus.append(tau)
    return {
        "items": items,
        "annotator_pairs": pairs,
        "pairwise_agreement": same / compared if compared else None,
        "kendall_tau": sum(taus) / len(taus) if taus else None,
        "per_annotator": {
            name: agreed / total for name, (agreed, total) in sorted(per_annotator.items()) if total
        },
    }
