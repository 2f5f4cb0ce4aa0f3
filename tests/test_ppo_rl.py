"""The PPO maths against numbers worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.ppo import rl


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected), atol=atol, rtol=0
    )


def test_gae_three_tokens_gamma_one_lambda_095():
    # Row 0: r = [0, 0, 1], V = [0.5, 0.4, 0.2], all valid.
    #   t=2: delta = 1 + 0 - 0.2 = 0.8                      A2 = 0.8
    #   t=1: delta = 0 + 0.2 - 0.4 = -0.2                   A1 = -0.2 + 0.95 * 0.8 = 0.56
    #   t=0: delta = 0 + 0.4 - 0.5 = -0.1                   A0 = -0.1 + 0.95 * 0.56 = 0.432
    # Row 1: two valid tokens, garbage on the padding must not leak in.
    #   t=1: delta = 2 + 0 - 0.5 = 1.5                      A1 = 1.5
    #   t=0: delta = 0 + 0.5 - 1 = -0.5                     A0 = -0.5 + 0.95 * 1.5 = 0.925
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.2], [1.0, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.432, 0.56, 0.8], [0.925, 1.5, 0.0]])
    close(returns, [[0.932, 0.96, 1.0], [1.925, 2.0, 0.0]])


def test_gae_with_lambda_one_gives_monte_carlo_returns():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.3, -0.7, 2.0]])
    mask = torch.ones(1, 3)
    advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(returns, [[6.0, 5.0, 3.0]])
    close(advantages, [[5.7, 5.7, 1.0]])


def test_masked_mean_var_and_whiten_ignore_padding():
    # Valid values 1, 2, 3: mean 2, unbiased variance (1 + 0 + 1) / 2 = 1, so whitening gives -1, 0, 1.
    values = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    close(rl.masked_mean(values, mask), 2.0)
    close(rl.masked_mean(values, mask, dim=1), [1.5, 3.0])
    close(rl.masked_var(values, mask), 1.0)
    close(rl.masked_var(values, mask, unbiased=False), 2.0 / 3.0)
    close(rl.masked_whiten(values, mask), [[-1.0, 0.0], [1.0, 0.0]], atol=1e-5)
    # Without the shift the mean (2) is kept: -1 + 2, 0 + 2, 1 + 2.
    close(rl.masked_whiten(values, mask, shift_mean=False), [[1.0, 2.0], [3.0, 0.0]], atol=1e-5)


def test_kl_estimators_k1_and_k3():
    logprobs = torch.tensor([-1.0, -2.0])
    ref_logprobs = torch.tensor([-1.5, -1.0])
    # k1 = logp - logq
    close(rl.kl_k1(logprobs, ref_logprobs), [0.5, -1.0])
    # k3 = (r - 1) - log r with log r = logq - logp = [-0.5, 1.0]
    close(rl.kl_k3(logprobs, ref_logprobs), [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1])
    close(rl.kl_estimate(logprobs, ref_logprobs, "k3"), [0.1065307, 0.7182818])


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    # Sampling from p = [0.75, 0.25] against q = [0.5, 0.5]: both average to KL(p || q) = 0.130812.
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    weights = p  # exact expectation instead of sampling
    k1 = (weights * rl.kl_k1(p.log(), q.log())).sum()
    k3 = (weights * rl.kl_k3(p.log(), q.log())).sum()
    close(k1, 0.130812)
    close(k3, 0.130812)


def test_shaped_rewards_put_the_score_on_the_last_valid_token():
    # beta = 0.1: row 0 -> [-0.01, -0.02, -0.03 + 2]; row 1 (two tokens) -> [-0.05, +0.05 - 1, 0].
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    close(rl.shaped_rewards(scores, kl, mask, beta=0.1), [[-0.01, -0.02, 1.97], [-0.05, -0.95, 0.0]])
    close(rl.last_token_index(mask), [2.0, 1.0])


def test_scores_are_clipped_then_penalised_for_a_missing_stop_token():
    # clip 3: 1 stays, -5.5 -> -3, 4 -> 3; penalty 1 on the rows without a stop token (the last two).
    scores, ended = torch.tensor([1.0, -5.5, 4.0]), torch.tensor([True, False, False])
    close(rl.clip_and_penalise(scores, ended, clip=3.0, missing_stop_penalty=1.0), [1.0, -4.0, 2.0])
    close(rl.clip_and_penalise(scores, ended, clip=3.0, missing_stop_penalty=None), [1.0, -3.0, 3.0])


def test_clipped_policy_loss_inside_and_outside_the_clip_range():
    # eps = 0.2, old log-probs 0 so the ratio is exp(logprobs).
    #   ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2  (clipped: no more credit past 1.2)
    #   ratio 0.5, A = +1: max(-0.5, -0.8) = -0.5  (unclipped: the pessimistic term)
    #   ratio 1.1, A = -2: max(2.2, 2.2)   = 2.2   (inside the range)
    #   ratio 0.5, A = -1: max(0.5, 0.8)   = 0.8   (clipped)
    # mean = (-1.2 - 0.5 + 2.2 + 0.8) / 4 = 0.325; clip fraction 2 / 4.
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 7.0]])
    advantages = torch.tensor([[1.0, 1.0, -2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    out = rl.clipped_policy_loss(ratios.log(), torch.zeros_like(ratios), advantages, mask, clip=0.2)
    close(out.loss, 0.325)
    close(out.clip_fraction, 0.5)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.5)) / 4
    close(out.approx_kl, expected_kl)


def test_clipped_policy_loss_gradient_vanishes_when_clipped():
    logprobs = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    out = rl.clipped_policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip=0.2)
    out.loss.backward()
    # d/dlogp of -ratio / 2 is -ratio / 2 inside the range, 0 where the clip holds.
    close(logprobs.grad, [[0.0, -0.55]])


def test_clipped_value_loss_inside_and_outside_the_clip_range():
    # eps = 0.2.
    #   V = 0.5, old 0, R = 1: clipped V = 0.2; max(0.25, 0.64) = 0.64  (clip binds)
    #   V = 0.1, old 0, R = 0: inside; 0.01
    #   V = 1.5, old 1, R = 1: clipped V = 1.2; max(0.25, 0.04) = 0.25
    # loss = 0.5 * (0.64 + 0.01 + 0.25) / 3 = 0.15; clip fraction 1 / 3.
    values = torch.tensor([[0.5, 0.1, 1.5, 3.0]])
    old_values = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clip_fraction = rl.clipped_value_loss(values, old_values, returns, mask, clip=0.2)
    close(loss, 0.15)
    close(clip_fraction, 1.0 / 3.0)


def test_logprobs_entropy_and_exact_kl_from_logits():
    # logits [ln 3, 0] -> p = [0.75, 0.25]
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    logprobs, entropy = rl.logprobs_and_entropy(logits, torch.tensor([[0, 1]]))
    close(logprobs, [[math.log(0.75), math.log(0.5)]])
    # H(0.75, 0.25) = -(0.75 ln 0.75 + 0.25 ln 0.25); H(uniform over 2) = ln 2
    close(entropy, [[0.5623351, math.log(2.0)]])
    close(rl.entropy_from_logits(logits), [[0.5623351, math.log(2.0)]])
    # temperature 2 halves the logits: p = [sqrt 3, 1] / (sqrt 3 + 1)
    close(
        rl.logprobs_and_entropy(logits, torch.tensor([[0, 1]]), 2.0)[0],
        [[math.log(0.6339746), math.log(0.5)]],
    )
    # KL([0.75, 0.25] || [0.5, 0.5]) = 0.75 ln 1.5 + 0.25 ln 0.5
    uniform = torch.zeros(1, 2, 2)
    close(rl.kl_from_logits(logits, uniform), [[0.130812, 0.0]])


def test_blockwise_exact_kl_matches_the_log_softmax_formula(monkeypatch):
    # 3 x 5 = 15 rows in blocks of 4 leaves a partial last block; float64 for a reference without rounding
    monkeypatch.setattr(rl, "KL_ROWS_PER_BLOCK", 4)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator, dtype=torch.float64) * 3
    ref_logits = logits + torch.randn(3, 5, 11, generator=generator, dtype=torch.float64)
    log_p, log_q = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(rl.kl_from_logits(logits, ref_logits), expected, rtol=1e-10, atol=1e-12)
    close(rl.kl_from_logits(logits, logits), torch.zeros(3, 5).tolist())  # a distribution against itself


def test_blockwise_logprobs_match_log_softmax_values_and_gradients(monkeypatch):
    # 3 x 5 = 15 rows in blocks of 4 leaves a partial last block
    monkeypatch.setattr(rl, "ROWS_PER_BLOCK", 4)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5), generator=generator)
    weights = torch.randn(3, 5, generator=generator)
    logprobs, entropy = rl.logprobs_and_entropy(logits, tokens, 0.7)
    (logprobs * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    log_p = torch.log_softmax(logits / 0.7, dim=-1)
    expected = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (expected * weights).sum().backward()
    torch.testing.assert_close(logprobs, expected)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1).detach())
    torch.testing.assert_close(ours, logits.grad)
    assert not entropy.requires_grad


def test_adaptive_kl_controller_follows_ziegler():
    # kl 9 vs target 6: error 0.5 clipped to 0.2; beta *= 1 + 0.2 * 100 / 10000 = 1.002
    assert math.isclose(rl.adaptive_kl_update(0.1, kl=9.0, target=6.0, horizon=10000, n_steps=100), 0.1002)
    # kl 5.4 vs target 6: error -0.1; beta *= 1 - 0.1 * 100 / 10000 = 0.999
    assert math.isclose(rl.adaptive_kl_update(0.1, kl=5.4, target=6.0, horizon=10000, n_steps=100), 0.0999)
    adaptive = rl.KLController(beta=0.1, target=6.0, horizon=10000)
    adaptive.update(9.0, n_steps=100)
    assert math.isclose(adaptive.beta, 0.1002)
    fixed = rl.KLController(beta=0.1)
    fixed.update(9.0, n_steps=100)
    assert fixed.beta == 0.1
    restored = rl.KLController(beta=0.5, target=6.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.beta == adaptive.beta


def test_the_length_fit_is_least_squares_and_its_correction_leaves_no_length_trend():
    import pytest

    from stages.ppo.config import Config
    from stages.ppo.length import fit_length

    lengths, scores = [10.0, 20.0, 30.0, 40.0], [1.0, 0.5, 0.2, -0.7]
    fit = fit_length(lengths, scores)
    # By hand: mean length 25, mean score 0.25; Sxy = -15*0.75 - 5*0.25 + 5*(-0.05) + 15*(-0.95) = -27, Sxx = 500.
    assert math.isclose(fit.slope, -27 / 500, rel_tol=1e-12)
    assert fit.mean_length == 25.0 and fit.replies == 4
    syy = sum((y - 0.25) ** 2 for y in scores)
    assert math.isclose(fit.correlation, -27 / math.sqrt(500 * syy), rel_tol=1e-12)
    corrected = fit.corrected(torch.tensor(scores, dtype=torch.float64), torch.tensor(lengths))
    residual_trend = sum(
        (x - 25.0) * (y - corrected.mean().item()) for x, y in zip(lengths, corrected.tolist(), strict=True)
    )
    assert abs(residual_trend) < 1e-12, "the corrected scores still move with length"
    assert math.isclose(corrected.mean().item(), 0.25, rel_tol=1e-12), "a correction moves no mean"
    assert fit.corrected(torch.tensor([3.0]), torch.tensor([25])).item() == 3.0  # the mean length: as it was
    flat = fit_length([7.0, 7.0, 7.0], [0.1, 0.4, -0.2])
    assert flat.slope == 0.0 and flat.correlation == 0.0
    with pytest.raises(ValueError, match="at least 2 replies"):
        fit_length([5.0], [1.0])
    with pytest.raises(ValueError, match="length_calibration must be at least 2"):
        Config(prompts="p.jsonl", length_correction="linear", length_calibration=1)


def test_the_length_corrected_critic_spares_replies_cut_off_by_the_limit():
    from pipeline.generation import Sequences
    from stages.ppo.length import LengthCorrected, LengthFit
    from stages.ppo.passes import Shared

    class ConstantCritic:
        net = torch.nn.Identity()

        def prepare(self, seq):
            return Shared()

        def values(self, seq, shared):
            return torch.zeros(seq.response.shape)

        def scores(self, seq, shared):
            return torch.ones(seq.response.shape[0])

        def prepared(self, net):
            return self

    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    seq = Sequences(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long),
                    torch.zeros(2, 5, dtype=torch.long), mask, torch.tensor([True, False]), torch.zeros(2, 5))  # fmt: skip
    critic = LengthCorrected(
        ConstantCritic(), LengthFit(slope=0.5, mean_length=4.0, correlation=0.9, replies=9)
    )
    # The finished 3-token reply: 1 - 0.5 * (3 - 4); the one cut off at the limit: as scored.
    assert critic.scores(seq, critic.prepare(seq)).tolist() == [1.5, 1.0]
    # The value before response token j, j tokens written: 0 - 0.5 * (j - 4), the same on every row.
    assert critic.values(seq, Shared()).tolist() == [[2.0, 1.5, 1.0, 0.5, 0.0]] * 2
    assert critic.prepared(torch.nn.Identity()).fit == critic.fit


def test_leave_one_out_advantages_subtract_the_mean_of_the_other_replies_to_the_prompt():
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, -1.0, 2.0])
    # groups of two: the other reply is the baseline
    torch.testing.assert_close(
        rl.leave_one_out_advantages(returns, 2), torch.tensor([-1.0, 1.0, -3.0, 3.0, 0.0, 0.0, -3.0, 3.0])
    )
    # groups of four, by hand: 1 - (2 + 3 + 6) / 3 = -8/3, 2 - 10/3 = -4/3, 3 - 3 = 0, 6 - 2 = 4
    first = rl.leave_one_out_advantages(returns, 4)[:4]
    torch.testing.assert_close(first, torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))


@pytest.mark.parametrize("group_size", [1, 3])
def test_leave_one_out_advantages_need_whole_groups_of_two_or_more(group_size):
    with pytest.raises(ValueError, match="groups of"):
        rl.leave_one_out_advantages(torch.zeros(8), group_size)
