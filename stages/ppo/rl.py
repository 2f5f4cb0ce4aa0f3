"""The PPO maths as small pure functions over tensors: KL estimators, shaped rewards, GAE, losses.

Shapes: B sequences, T response tokens. `mask` is 1.0 on response tokens (up to and including the stop
token) and 0.0 on the padding after them, so responses are left-aligned and the last valid token of row b
is at index mask[b].sum() - 1. Everything here is deterministic and free of model code, so each function
is tested against numbers worked out by hand (tests/test_ppo_rl.py).

References: Ziegler et al. 2019 (KL-shaped rewards, adaptive KL controller), Schulman et al. 2016 (GAE),
Schulman et al. 2017 (clipped surrogate), Schulman's "Approximating KL divergence" note (k1, k3), Ahmadian
et al. 2024 (REINFORCE leave-one-out: a baseline from the other replies to the same prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3"]


# -- log-probabilities and entropy -----------------------------------------------------------------


def logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """log p(token) and the entropy at each position of softmax(logits / temperature).

    logits [B, T, V], tokens [B, T] -> log-probs [B, T] (differentiable) and entropy [B, T] (no gradient;
    `entropy_from_logits` gives one for an entropy bonus). Same values as log_softmax and a gather.
    """
    return _TokenLogprobs.apply(logits, tokens, temperature)


# Rows of the vocabulary-wide work done at a time. Each elementwise step over [B, T, V] would allocate a
# fresh tensor of that size (50 MB at 8 x 32 x 49k), and on CPU fresh memory costs a page fault per 4 kB:
# done whole, these steps took longer than the vocabulary projection itself. A block of rows stays in cache.
# Accelerators keep freed memory in a caching allocator and want few large kernels: one block there.
ROWS_PER_BLOCK = 8


# The exact KL's two log-sum-exps per row run best on longer blocks: over 16 x 48 positions of a 49k
# vocabulary, 128 rows at a time took half the time of the whole-batch formula (bench/exact_kl.py).
KL_ROWS_PER_BLOCK = 128


def row_blocks(flat: Tensor, rows: int) -> list[slice]:
    step = rows if flat.device.type == "cpu" else max(flat.shape[0], 1)
    return [slice(start, start + step) for start in range(0, flat.shape[0], step)]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        flat, picked = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        lse = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
        entropy = torch.empty_like(lse)
        token_logits = flat.gather(1, picked).squeeze(1) / temperature
        for rows in row_blocks(flat, ROWS_PER_BLOCK):
            scaled = flat[rows] / temperature
            lse[rows] = torch.logsumexp(scaled, dim=-1)
            probs = scaled.sub(lse[rows, None]).exp_()
            # H = -sum p (z - lse) = lse - sum p z
            entropy[rows] = lse[rows] - probs.mul_(scaled).sum(-1)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        entropy = entropy.view(tokens.shape)
        ctx.mark_non_differentiable(entropy)
        return (token_logits - lse).view(tokens.shape), entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, _grad_entropy: Tensor) -> tuple[Tensor, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        flat, picked = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        # d log p(token) / d z = onehot(token) - softmax(z), and z = logits / temperature
        grad_z = grad_logprobs.reshape(-1, 1) / ctx.temperature
        grad = torch.empty_like(flat)
        for rows in row_blocks(flat, ROWS_PER_BLOCK):
            block = torch.div(flat[rows], ctx.temperature, out=grad[rows])
            block.sub_(lse[rows, None]).exp_().mul_(-grad_z[rows])
        grad.scatter_add_(1, picked, grad_z)
        return grad.view_as(logits), None, None


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position: [B, T, V] -> [B, T]."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def kl_from_logits(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(p || q) over the vocabulary at each position: [B, T, V] x2 -> [B, T] (for evaluation).

    With p = softmax(z) and q = softmax(w), KL = sum_v p_v (z_v - w_v) - logsumexp(z) + logsumexp(w): a
    block of rows at a time, so the temporaries are a block's size, not the batch's (ROWS_PER_BLOCK).
    """
    flat, ref = logits.reshape(-1, logits.shape[-1]), ref_logits.reshape(-1, ref_logits.shape[-1])
    kl = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    for rows in row_blocks(flat, KL_ROWS_PER_BLOCK):
        z, w = flat[rows], ref[rows]
        lse_p, lse_q = torch.logsumexp(z, dim=-1), torch.logsumexp(w, dim=-1)
        p = z.sub(lse_p[:, None]).exp_()
        kl[rows] = p.mul_(z - w).sum(-1) - lse_p + lse_q
    return kl.view(logits.shape[:-1])


# -- KL estimators and shaped rewards --------------------------------------------------------------


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 = log p - log q: unbiased for KL(p || q) under samples from p, can be negative."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 = (r - 1) - log r with r = q / p: unbiased, never negative, lower variance than k1."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator) -> Tensor:
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last valid token of each row of a left-aligned mask [B, T] -> [B] (0 for empty rows)."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards: -beta * KL at every response token, plus the sequence score at the last one.

    scores [B], kl [B, T], mask [B, T] -> [B, T]; zero on padding.
    """
    rewards = -beta * kl * mask
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def clip_and_penalise(
    scores: Tensor, ended: Tensor, *, clip: float, missing_stop_penalty: float | None
) -> Tensor:
    """Standardised scores [B] clipped to [-clip, clip], minus the penalty where a response has no stop
    token (`ended` [B] False): a response cut off by the length limit is not a finished answer."""
    scores = scores.clamp(-clip, clip)
    if missing_stop_penalty is None:
        return scores
    return scores - missing_stop_penalty * (~ended).float()


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where mask is 1 (over all elements, or along `dim`)."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` where mask is 1; Bessel-corrected by default (as in TRL and OpenAI's lm-human-preferences)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise to unit variance (and zero mean when shift_mean) using only masked elements; zero on padding."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# -- advantages ------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over left-aligned responses: (advantages, returns), each [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero
    after the last valid token (the episode ends there). Returns are A + V, the value targets.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def leave_one_out_advantages(returns: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024): each reply's return less the mean return of the other replies to the
    same prompt, a baseline that needs no value model. returns [B], each prompt's `group_size` replies
    adjacent -> [B]."""
    if group_size < 2 or returns.shape[0] % group_size:
        raise ValueError(f"{returns.shape[0]} returns do not split into groups of {group_size} (at least 2)")
    groups = returns.view(-1, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()


# -- losses ----------------------------------------------------------------------------------------


@dataclass
class PolicyLoss:
    loss: Tensor
    """Clipped surrogate loss to minimise (scalar)."""
    clip_fraction: Tensor
    """Share of tokens whose ratio the clip made inactive."""
    approx_kl: Tensor
    """k3 estimate of KL(old || new) over the tokens, a health check of the update size."""


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float
) -> PolicyLoss:
    """PPO's clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped within +-clip of the rollout's values.

    Returns (loss, clip_fraction).
    """
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    error = (values - returns) ** 2
    error_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, error_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((error_clipped > error).float(), mask)
    return loss, clip_fraction


# -- KL coefficient --------------------------------------------------------------------------------


def adaptive_kl_update(beta: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al.'s proportional controller: beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


@dataclass
class KLController:
    """The KL coefficient beta: fixed when `target` is None, adapted towards `target` otherwise."""

    beta: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> None:
        """Move beta after a batch of `n_steps` episodes whose mean KL was `kl`."""
        if self.target is not None:
            self.beta = adaptive_kl_update(self.beta, kl, self.target, self.horizon, n_steps)

    def state_dict(self) -> dict[str, float | int | None]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.beta = float(state["beta"])  # type: ignore[arg-type]
