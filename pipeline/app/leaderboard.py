"""The arena's leaderboard: Bradley-Terry ratings of every model with votes, bootstrap intervals, win rates.

The model: P(i beats j) = sigmoid(theta_i - theta_j). A tie (and "both bad") counts as half a win to
each side. Every model is also credited with `a` wins and `a` losses against a virtual model of rating 0:
without that prior a model that won every vote would have an infinite rating; with it the rating is finite
and large, and the prior's pull fades as votes come in. The fit maximises

    L(theta) = sum_ij W_ij log sigmoid(theta_i - theta_j) + a sum_i [log sigmoid(theta_i) + log sigmoid(-theta_i)]

(W_ij: i's wins over j), which is strictly concave, by Newton's method, halving a step until L rises. (Hunter's
MM algorithm needs no step control but took thousands of iterations here: the prior is all that fixes the
ratings' common offset, and MM moves along that direction very slowly.)
Ratings are reported centred (the mean model at 0) on the Elo scale, 1000 + 400 * theta / ln 10, as
Chatbot Arena does: 100 points apart means the stronger model wins 64% of the time.

The 95% intervals are bootstrap percentiles: the votes are resampled with replacement (by a generator the
caller seeds, so a leaderboard is reproducible) and the model refitted, all resamples at once. Votes that
share a pair of players and an outcome are interchangeable, so resampling votes is a multinomial draw over
at most 3 n^2 kinds of vote, and a thousand refits take well under a second for a few models.

Beside the human win rate (wins plus half the ties, over votes) stands the reward model's: for each vote
the reward model scores both replies (pipeline.scoring, as everywhere else), and its verdict is counted as
a person's would be. A vote with the same model on both sides says nothing about either and is left out.
Only blind votes rate models, as in Chatbot Arena: a person who saw the names before voting judged the
names as well as the replies, so named-mode votes are counted and reported but never rated (`blind`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.app.votes import ArenaVote

ELO_SCALE = 400 / math.log(10)
ELO_CENTRE = 1000.0
PRIOR_GAMES = 1.0
BOOTSTRAP_SAMPLES = 1000
LEVEL = 0.95
# Score of the left reply: 1 it won, 0 it lost, 0.5 a tie. "Both bad" is a tie: neither is preferred.
LEFT_SCORE = {"left": 1.0, "right": 0.0, "tie": 0.5, "both_bad": 0.5}


@dataclass(frozen=True)
class Outcomes:
    """Votes as games between numbered players, grouped into kinds: (first, second, first's score) x count."""

    players: list[str]
    first: np.ndarray
    """(T,) int: the left player of each kind of vote."""
    second: np.ndarray
    """(T,) int: the right player."""
    score: np.ndarray
    """(T,) float: the left player's score, 1, 0.5 or 0."""
    count: np.ndarray
    """(T,) int: how many votes were of this kind."""

    def win_matrices(self, counts: np.ndarray) -> np.ndarray:
        """(..., n, n) wins of row over column for (..., T) counts of each kind (ties as halves)."""
        n = len(self.players)
        contribution = np.zeros((len(self.count), n * n))
        kinds = np.arange(len(self.count))
        np.add.at(contribution, (kinds, self.first * n + self.second), self.score)
        np.add.at(contribution, (kinds, self.second * n + self.first), 1.0 - self.score)
        return (counts @ contribution).reshape(*counts.shape[:-1], n, n)


def outcomes_of(votes: Sequence[ArenaVote], scores: Sequence[float] | None = None) -> Outcomes:
    """The votes as outcomes; `scores` overrides each vote's left score (the reward model's verdicts)."""
    scores = [LEFT_SCORE[vote.verdict] for vote in votes] if scores is None else list(scores)
    games = [(v.left.player, v.right.player, s) for v, s in zip(votes, scores, strict=True)]
    games = [game for game in games if game[0] != game[1]]
    players = sorted({g[0] for g in games} | {g[1] for g in games})
    index = {player: i for i, player in enumerate(players)}
    kinds: dict[tuple[int, int, float], int] = {}
    for left, right, score in games:
        key = (index[left], index[right], score)
        kinds[key] = kinds.get(key, 0) + 1
    keys = sorted(kinds)
    return Outcomes(
        players=players,
        first=np.array([k[0] for k in keys], dtype=np.int64),
        second=np.array([k[1] for k in keys], dtype=np.int64),
        score=np.array([k[2] for k in keys], dtype=np.float64),
        count=np.array([kinds[k] for k in keys], dtype=np.int64),
    )


def fit_bradley_terry(
    wins: np.ndarray, prior: float = PRIOR_GAMES, tol: float = 1e-9, max_iter: int = 100
) -> np.ndarray:
    """Centred ratings theta (..., n) maximising L above for win matrices (..., n, n), all at once."""
    if prior <= 0:
        raise ValueError(f"prior must be positive (it keeps an unbeaten model finite), got {prior}")
    games = wins + np.swapaxes(wins, -1, -2)
    theta = np.zeros(wins.shape[:-1])
    objective = log_likelihood(theta, wins, prior)
    for _ in range(max_iter):
        p = sigmoid(theta[..., :, None] - theta[..., None, :])  # [i, j]: P(i beats j)
        anchor = sigmoid(theta)
        gradient = (wins - games * p).sum(axis=-1) + prior * (1 - 2 * anchor)
        curvature = games * p * (1 - p)
        # -H: the (positive definite) negative Hessian of L.
        negative_hessian = -curvature
        diagonal = curvature.sum(axis=-1) + 2 * prior * anchor * (1 - anchor)
        negative_hessian[..., np.arange(theta.shape[-1]), np.arange(theta.shape[-1])] = diagonal
        step = np.linalg.solve(negative_hessian, gradient[..., None])[..., 0]
        if np.abs(step).max() < tol:
            break
        scale = np.ones(theta.shape[:-1] + (1,))
        for _ in range(50):  # halve the step of each fit whose objective fell, until every one rose
            candidate = theta + scale * step
            value = log_likelihood(candidate, wins, prior)
            fell = value < objective - 1e-12 * np.abs(objective)
            if not fell.any():
                break
            scale[fell] /= 2
        theta, objective = candidate, value
    return theta - theta.mean(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(x / 2))  # no overflow for large |x|


def log_likelihood(theta: np.ndarray, wins: np.ndarray, prior: float) -> np.ndarray:
    """L(theta) above, per fit: log sigmoid(x) = -log(1 + exp(-x)), written to stay finite."""
    diff = theta[..., :, None] - theta[..., None, :]
    data = -(wins * np.logaddexp(0, -diff)).sum(axis=(-1, -2))
    return data - prior * (np.logaddexp(0, -theta) + np.logaddexp(0, theta)).sum(axis=-1)


def bootstrap_thetas(outcomes: Outcomes, samples: int, rng: np.random.Generator) -> np.ndarray:
    """(samples, n) centred log-strengths, each fitted to the votes resampled with replacement."""
    total = int(outcomes.count.sum())
    counts = rng.multinomial(total, outcomes.count / total, size=samples).astype(np.float64)
    return fit_bradley_terry(outcomes.win_matrices(counts))


def blind(votes: Sequence[ArenaVote]) -> list[ArenaVote]:
    """The votes cast before the models' names were shown (anonymous mode): the only ones that rate them."""
    return [vote for vote in votes if vote.mode == "anonymous"]


def elo(theta: np.ndarray | float) -> np.ndarray | float:
    return ELO_CENTRE + ELO_SCALE * theta


@dataclass(frozen=True)
class Standing:
    """One model's line on the leaderboard."""

    model: str
    """The artifact id (or the model source, for a model outside the store)."""
    rating: float
    """Bradley-Terry rating on the Elo scale; 1000 is the mean model."""
    lower: float
    upper: float
    """The 95% bootstrap interval of the rating."""
    votes: int
    wins: int
    ties: int
    """Ties and "both bad" together."""
    losses: int
    both_bad: int
    win_rate: float
    """Human verdicts: (wins + ties / 2) / votes."""
    rm_win_rate: float | None = None
    """The reward model's verdicts on the same votes, counted the same way; None without a reward model."""


def leaderboard(
    votes: Sequence[ArenaVote],
    *,
    rm_scores: Sequence[float] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> list[Standing]:
    """Every model with votes, best first. `rm_scores`: the reward model's left score per vote (rm_verdicts)."""
    outcomes = outcomes_of(votes)
    if not outcomes.players:
        return []
    theta = fit_bradley_terry(outcomes.win_matrices(outcomes.count.astype(np.float64)))
    resampled = bootstrap_thetas(outcomes, samples, np.random.default_rng(seed))
    tail = (1 - LEVEL) / 2 * 100
    lower, upper = np.percentile(resampled, [tail, 100 - tail], axis=0)
    rm_rates = win_rates(votes, rm_scores) if rm_scores is not None else {}
    human = tallies(votes)
    standings = [
        Standing(
            model=player,
            rating=float(elo(theta[i])),
            lower=float(elo(lower[i])),
            upper=float(elo(upper[i])),
            rm_win_rate=rm_rates.get(player),
            **human[player],
        )
        for i, player in enumerate(outcomes.players)
    ]
    return sorted(standings, key=lambda s: (-s.rating, s.model))


def tallies(votes: Sequence[ArenaVote]) -> dict[str, dict]:
    """Per player: votes, wins, ties, losses, both_bad and the win rate, from the human verdicts."""
    counts: dict[str, dict] = {}
    for vote in votes:
        if vote.left.player == vote.right.player:
            continue
        for player, own in ((vote.left.player, "left"), (vote.right.player, "right")):
            row = counts.setdefault(player, {"votes": 0, "wins": 0, "ties": 0, "losses": 0, "both_bad": 0})
            row["votes"] += 1
            if vote.verdict in ("tie", "both_bad"):
                row["ties"] += 1
                row["both_bad"] += vote.verdict == "both_bad"
            else:
                row["wins" if vote.verdict == own else "losses"] += 1
    for row in counts.values():
        row["win_rate"] = (row["wins"] + row["ties"] / 2) / row["votes"]
    return counts


def win_rates(votes: Sequence[ArenaVote], left_scores: Sequence[float]) -> dict[str, float]:
    """Per player: its mean score over its votes, given the left side's score in each (1, 0.5 or 0)."""
    totals: dict[str, list[float]] = {}
    for vote, score in zip(votes, left_scores, strict=True):
        if vote.left.player == vote.right.player:
            continue
        totals.setdefault(vote.left.player, []).append(score)
        totals.setdefault(vote.right.player, []).append(1.0 - score)
    return {player: sum(scores) / len(scores) for player, scores in totals.items()}


def rm_verdicts(votes: Sequence[ArenaVote], reward) -> list[float]:
    """The reward model's left score per vote: 1 when it scores the left reply higher, 0 lower, 0.5 equal.

    `reward` is a pipeline.scoring.LoadedRewardModel.
    """
    verdicts = []
    for vote in votes:
        left, right = reward.score(vote.prompt, [vote.left.text, vote.right.text])
        verdicts.append(1.0 if left > right else 0.0 if left < right else 0.5)
    return verdicts


def agreement(votes: Sequence[ArenaVote], left_scores: Sequence[float]) -> tuple[int, int]:
    """(votes where the reward model picked the person's winner, decisive human votes it was asked about)."""
    decisive = [
        (v, s)
        for v, s in zip(votes, left_scores, strict=True)
        if v.verdict in ("left", "right") and v.left.player != v.right.player
    ]
    agreed = sum((s == 1.0) == (v.verdict == "left") and s != 0.5 for v, s in decisive)
    return agreed, len(decisive)


def format_table(standings: Sequence[Standing]) -> str:
    """The leaderboard as a plain-text table for the terminal."""
    with_rm = any(s.rm_win_rate is not None for s in standings)
    header = ["#", "model", "rating", "95% interval", "votes", "W/T/L", "both bad", "win rate"]
    header += ["RM win rate"] if with_rm else []
    rows = [header]
    for place, s in enumerate(standings, 1):
        row = [
            str(place),
            s.model,
            f"{s.rating:.0f}",
            f"{s.lower:.0f} - {s.upper:.0f}",
            str(s.votes),
            f"{s.wins}/{s.ties}/{s.losses}",
            str(s.both_bad),
            f"{s.win_rate:.0%}",
        ]
        if with_rm:
            row.append("-" if s.rm_win_rate is None else f"{s.rm_win_rate:.0%}")
        rows.append(row)
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    numeric = {0, 2, 3, 4, 5, 6, 7, 8}
    return "\n".join(
        "  ".join(
            cell.rjust(w) if c in numeric else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )
