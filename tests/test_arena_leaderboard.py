"""The leaderboard's Bradley-Terry fit, its bootstrap intervals, and the human and reward-model win rates."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from pipeline.app.leaderboard import (
    ELO_SCALE,
    agreement,
    bootstrap_thetas,
    fit_bradley_terry,
    format_table,
    leaderboard,
    outcomes_of,
    win_rates,
)
from pipeline.app.votes import ArenaVote, Reply

PROMPT = [{"role": "user", "content": "Hi"}]


def vote(left: str, right: str, verdict: str, i: int = 0) -> ArenaVote:
    return ArenaVote(i, "ann", PROMPT, Reply(f"{left} says hi", left, left), Reply(f"{right} says hi", right, right),
                     verdict, "anonymous", None, float(i))  # fmt: skip


def synthetic_votes(
    theta: list[float], n_votes: int, rng: random.Random, tie_rate: float = 0.0
) -> list[ArenaVote]:
    """Votes between random pairs of players with log-strengths `theta`, drawn from the Bradley-Terry model.

    A tie (drawn with probability tie_rate, whatever the pair) is half a win to each side: it pulls every
    expected score towards 1/2, so the fitted ratings come out closer together than `theta`, in the same order.
    """
    votes = []
    for i in range(n_votes):
        a, b = rng.sample(range(len(theta)), 2)
        if rng.random() < tie_rate:
            verdict = rng.choice(["tie", "both_bad"])
        else:
            verdict = "left" if rng.random() < 1 / (1 + math.exp(theta[b] - theta[a])) else "right"
        votes.append(vote(f"m{a}", f"m{b}", verdict, i))
    return votes


def test_the_fit_matches_hand_arithmetic():
    # A beat B 3 times and lost once: the maximum-likelihood odds are 3:1, so theta_A - theta_B = ln 3,
    # centred at +-ln(3)/2. A tiny prior leaves that unchanged.
    wins = np.array([[0.0, 3.0], [1.0, 0.0]])
    theta = fit_bradley_terry(wins, prior=1e-9)
    assert theta == pytest.approx([math.log(3) / 2, -math.log(3) / 2], abs=1e-6)
    # Two ties count as one win each: 4:2 is odds 2:1.
    assert np.diff(fit_bradley_terry(np.array([[0.0, 4.0], [2.0, 0.0]]), prior=1e-9)) == pytest.approx(
        -math.log(2)
    )


def test_an_unbeaten_model_stays_finite_and_first():
    wins = np.array([[0.0, 10.0, 10.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0]])
    theta = fit_bradley_terry(wins)
    assert np.isfinite(theta).all() and theta[0] > 1.0 > theta[1] == pytest.approx(theta[2])
    # A won all 20 of its games; the prior's one virtual loss (against a model of rating 0) is what holds it:
    # its fitted odds against the others come out near 24:1 (3.2 in log-odds) rather than infinite.
    assert theta[0] - theta[1] == pytest.approx(3.16, abs=0.01)


def test_ratings_recover_the_order_of_known_strengths():
    theta = [-1.2, -0.6, -0.2, 0.3, 0.8, 1.4]
    with_ties = leaderboard(synthetic_votes(theta, 3000, random.Random(7), tie_rate=0.2), samples=200, seed=1)
    assert [s.model for s in with_ties] == ["m5", "m4", "m3", "m2", "m1", "m0"]
    standings = leaderboard(synthetic_votes(theta, 3000, random.Random(8)), samples=200, seed=1)
    assert [s.model for s in standings] == ["m5", "m4", "m3", "m2", "m1", "m0"]
    centred = np.array(theta) - np.mean(theta)
    fitted = [(s.rating - 1000) / ELO_SCALE for s in sorted(standings, key=lambda s: s.model)]
    assert fitted == pytest.approx(centred, abs=0.15)  # about two standard errors at 3000 votes
    assert all(s.lower < s.rating < s.upper for s in standings)


def test_the_intervals_cover_the_truth_at_about_the_nominal_rate():
    theta = np.array([-0.8, -0.3, 0.0, 0.4, 0.7])
    truth = theta - theta.mean()
    covered = []
    for replication in range(40):
        votes = synthetic_votes(list(theta), 300, random.Random(replication))
        outcomes = outcomes_of(votes)
        assert outcomes.players == ["m0", "m1", "m2", "m3", "m4"]
        resampled = bootstrap_thetas(outcomes, 200, np.random.default_rng(replication))
        lower, upper = np.percentile(resampled, [2.5, 97.5], axis=0)
        covered += list((lower <= truth) & (truth <= upper))
    coverage = np.mean(covered)
    assert 0.85 <= coverage <= 1.0, coverage  # 200 intervals of nominal 95%


def test_the_bootstrap_is_reproducible_from_its_seed():
    votes = synthetic_votes([0.0, 0.5, 1.0], 100, random.Random(3))
    first, second = leaderboard(votes, samples=50, seed=4), leaderboard(votes, samples=50, seed=4)
    assert first == second
    assert leaderboard(votes, samples=50, seed=5)[0].lower != first[0].lower


def test_counts_and_win_rates_human_and_reward_model():
    votes = [
        vote("a", "b", "left", 0),
        vote("b", "a", "left", 1),
        vote("a", "b", "tie", 2),
        vote("a", "c", "both_bad", 3),
        vote("c", "c", "left", 4),  # the same model on both sides: left out
    ]
    rm = [1.0, 0.0, 1.0, 0.5, 1.0]
    standings = {s.model: s for s in leaderboard(votes, rm_scores=rm, samples=20)}
    assert sorted(standings) == ["a", "b", "c"]
    a = standings["a"]
    assert (a.votes, a.wins, a.ties, a.losses, a.both_bad) == (4, 1, 2, 1, 1)
    assert a.win_rate == pytest.approx((1 + 2 / 2) / 4)
    # The reward model: a wins votes 0, 1 (right scored higher) and 2, and ties vote 3.
    assert a.rm_win_rate == pytest.approx(3.5 / 4) and standings["b"].rm_win_rate == pytest.approx(0.0)
    assert win_rates(votes, rm)["c"] == pytest.approx(0.5)
    assert agreement(votes, rm) == (1, 2)  # decisive human votes 0 and 1; the RM agreed on vote 0
    table = format_table(list(standings.values()))
    assert table.splitlines()[0].split()[:3] == ["#", "model", "rating"] and "RM win rate" in table
    assert "RM win rate" not in format_table(leaderboard(votes, samples=20))
    assert leaderboard([]) == []


def test_rlhf_label_leaderboard_prints_the_table_with_the_reward_models_verdicts(
    tmp_path, tiny_tokenizer, capsys
):
    from ppo_helpers import REWARD_MEAN, REWARD_STD, build_liking_reward_model

    from pipeline.app.db import open_db
    from pipeline.app.leaderboard import rm_verdicts
    from pipeline.app.users import add_user
    from pipeline.app.votes import arena_votes, record_arena_vote
    from pipeline.cli import main
    from pipeline.models import write_card
    from pipeline.scoring import load_reward
    from pipeline.store import ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    at = ["--store", str(store.root)]
    assert main(["label", "leaderboard", *at]) == 0
    assert "no anonymous arena votes" in capsys.readouterr().out
    rm_dir = build_liking_reward_model(tiny_tokenizer, tmp_path / "rm")
    write_card(
        rm_dir, {"kind": "reward", "reward_mean": REWARD_MEAN, "reward_std": REWARD_STD, "max_length": 64}
    )
    reward = store.publish("reward", rm_dir, config={})
    db = open_db(tmp_path / "store" / "labels.db")
    add_user(db, "ann", "annotator", "ann-password")
    replies = {"sft-1": "The cat sat on the mat.", "ppo-2": "Hello there, how are you today?"}
    for i, verdict in enumerate(["left", "right", "right", "tie"]):
        left, right = ("sft-1", "ppo-2") if i % 2 == 0 else ("ppo-2", "sft-1")
        record_arena_vote(db, "ann", f"vote-key-{i:08d}", PROMPT, Reply(replies[left], left, left),
                          Reply(replies[right], right, right), verdict)  # fmt: skip
    # Named mode: the voter saw the names first, so this vote is kept but rates nobody.
    record_arena_vote(db, "ann", "vote-key-named00", PROMPT, Reply(replies["sft-1"], "sft-1", "sft-1"),
                      Reply(replies["ppo-2"], "ppo-2", "ppo-2"), "right", mode="named")  # fmt: skip
    loaded = load_reward(reward.id, store)
    raw = loaded.score(PROMPT, [replies["sft-1"], replies["ppo-2"]])
    assert raw[0] != raw[1]
    rm_prefers = "sft-1" if raw[0] > raw[1] else "ppo-2"
    votes = [vote for vote in arena_votes(db) if vote.mode == "anonymous"]
    assert rm_verdicts(votes, loaded) == [1.0 if v.left.player == rm_prefers else 0.0 for v in votes]

    assert main(["label", "leaderboard", *at, "--reward", reward.id, "--samples", "50"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["#", "model", "rating", "95%", "interval", "votes", "W/T/L", "both", "bad",
                              "win", "rate", "RM", "win", "rate"]  # fmt: skip
    # Human verdicts: sft-1 won votes 0 (on the left) and 1 (on the right), lost 2 and tied 3: 2.5 of 4.
    rows = {line.split()[1]: line.split() for line in out[1:3]}
    assert rows["sft-1"][-3:] == ["0", "62%", "100%" if rm_prefers == "sft-1" else "0%"]
    assert rows["sft-1"][0] == "1" and rows["sft-1"][6:8] == ["4", "2/1/1"]
    assert out[3] == "4 votes; ratings on the Elo scale (1000: the mean model), 95% bootstrap intervals"
    assert out[4] == "1 named-mode votes are not rated: their voters saw the models' names first"
    agreed = 2 if rm_prefers == "sft-1" else 1
    assert (
        out[5] == f"the reward model {reward.id} agrees with {agreed} of 3 decisive votes ({agreed / 3:.0%})"
    )
