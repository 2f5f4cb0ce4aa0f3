"""What every engine shares: the settings of a draw, the record of a sampled batch, and the draw itself.

A batch is laid out as [left-padded prompt | response, right-padded after its stop token]; position ids
come from the attention mask's cumulative sum, so a left-padded prompt sees the positions it would see
alone. Tokens are drawn with an explicit `torch.Generator` (a PPO checkpoint saves it, so a resumed run
samples the same tokens), one uniform number per row per step whatever the engine, so two engines
with the same logits draw the same tokens. The log-prob of each drawn token comes from the same
softmax it was drawn from: logits / temperature, renormalised over the top-p nucleus when top_p < 1.

Engines that decode token by token (pipeline.generation.llama) implement `Decoder`'s two calls and run
`decode`; the transformers engine draws inside `generate` through `pick`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SamplingSettings:
    """How to sample; the same names in the stages, the app and `rlhf label generate`."""

    max_new_tokens: int = 128
    """Response length limit in tokens."""
    temperature: float = 1.0
    """Logits are divided by this before the softmax; 0 picks the most likely token (greedy)."""
    top_p: float = 1.0
    """Draw only from the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Sequences:
    """A batch of prompts with sampled responses."""

    query: Tensor
    """[B, P] prompt ids, left-padded."""
    query_mask: Tensor
    """[B, P] 1 on prompt tokens, 0 on padding."""
    response: Tensor
    """[B, R] response ids, pad after the first stop token."""
    response_mask: Tensor
    """[B, R] float, 1 on response tokens up to and including the first stop token."""
    ended: Tensor
    """[B] bool: the response contains a stop token (else it ran into max_new_tokens)."""
    logprobs: Tensor
    """[B, R] log-probs of the sampled tokens under the sampling distribution, 0 after the response."""

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)

    def select(self, rows: Tensor) -> Sequences:
        """The rows `rows`, without the prompt columns that are padding in all of them and the response
        columns past the longest of their responses."""
        query_mask = self.query_mask[rows]
        first = int(query_mask.any(0).long().argmax())
        width = max(int(self.response_mask[rows].sum(-1).max()), 1)
        return Sequences(
            query=self.query[rows][:, first:],
            query_mask=query_mask[:, first:],
            response=self.response[rows][:, :width],
            response_mask=self.response_mask[rows][:, :width],
            ended=self.ended[rows],
            logprobs=self.logprobs[rows][:, :width],
        )


def position_ids(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over real tokens; padding on the left gets 0 (it attends to nothing anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]), padded on the left so that generation continues from real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def truncate_at_stop(response: Tensor, stop_ids: Sequence[int], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mask everything after the first stop token: (response with pad there, mask [B, R] float, ended [B])."""
    is_stop = torch.isin(response, torch.tensor(list(stop_ids), dtype=torch.long, device=response.device))
    # Stops seen strictly before each position: a token is kept while none has been seen yet.
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()
    keep = stops_before == 0
    return response.masked_fill(~keep, pad_id), keep.float(), is_stop.any(-1)


def finish(
    query: Tensor, query_mask: Tensor, tokens: Tensor, logprobs: Tensor, stop_ids: Sequence[int], pad_id: int
) -> Sequences:
    """The Sequences record of drawn `tokens` [B, R] and their `logprobs` [B, R]: cut after each stop."""
    response, response_mask, ended = truncate_at_stop(tokens, stop_ids, pad_id)
    return Sequences(query, query_mask, response, response_mask, ended, logprobs * response_mask)


# -- the draw ------------------------------------------------------------------------------------------


def pick(
    logits: Tensor, settings: SamplingSettings, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """A token per row of `logits` [B, V] and its log-prob under the distribution it was drawn from."""
    if settings.temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits.float(), -1).gather(1, token[:, None]).squeeze(1)
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1:
        probs = nucleus(probs, settings.top_p)
    token = inverse_cdf(probs, generator)
    return token, probs.gather(1, token[:, None]).squeeze(1).log()


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """`probs` [B, V] renormalised over each row's smallest set of most likely tokens with mass >= top_p."""
    ordered, order = probs.sort(dim=-1, descending=True)
    mass_before = ordered.cumsum(-1) - ordered
    ordered = ordered.masked_fill(mass_before >= top_p, 0.0)  # the most likely token always stays
    kept = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return kept / kept.sum(-1, keepdim=True)


CDF_BLOCK = 256


def inverse_cdf(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row of `probs` [B, V], drawn with one uniform number per row.

    torch.multinomial draws one number per vocabulary entry, which at a 50k vocabulary costs more than a
    decode step's attention. The cumulative sum runs in two levels: over blocks of 256 entries, then
    inside the block that holds the draw, both in double precision (no drift over 50k terms); one
    cumulative sum over the whole vocabulary in double cost more than the rest of a sampling step.
    """
    rows, vocab = probs.shape
    if vocab % CDF_BLOCK:
        probs = F.pad(probs, (0, -vocab % CDF_BLOCK))
    blocks = probs.view(rows, -1, CDF_BLOCK)
    block_mass = blocks.sum(-1).double()  # 256 terms add up in float; the 50k-term sum runs in double
    cdf = block_mass.cumsum(-1)
    u = torch.rand(rows, 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    # side="right": the first entry whose cumulative mass exceeds u, so never one of zero mass.
    block = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
    inside = blocks.gather(1, block[..., None].expand(-1, -1, CDF_BLOCK)).squeeze(1).double().cumsum(-1)
    # What is left of u inside that block, kept in [0, its mass) against rounding between the two levels.
    rest = (u - cdf.gather(1, block) + block_mass.gather(1, block)).clamp(min=0)
    rest = torch.minimum(rest, inside[:, -1:] * (1 - 1e-12))
    return (block * CDF_BLOCK + torch.searchsorted(inside, rest, right=True)).squeeze(1)


# -- token-by-token decoding ---------------------------------------------------------------------------


class Decoder(Protocol):
    """A KV-cache decode loop's two calls."""

    def prefill(self, query: Tensor, mask: Tensor, new_tokens: int) -> Tensor:
        """Logits [B, V] after the left-padded prompts; room in the cache for `new_tokens` more."""
        ...

    def step(self, token: Tensor) -> Tensor:
        """Logits [B, V] after one more token per row."""
        ...


def decode_steps(
    decoder: Decoder,
    query: Tensor,
    query_mask: Tensor,
    settings: SamplingSettings,
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(token [B], log-prob [B]) per step until every row has drawn a stop token or the length limit.

    A row that has stopped keeps drawing pad tokens, so each row takes the same uniform numbers from the
    generator however early it stops.
    """
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=query.device)
    finished = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    logits = decoder.prefill(query, query_mask, settings.max_new_tokens)
    for step in range(settings.max_new_tokens):
        token, logprob = pick(logits, settings, generator)
        token = token.masked_fill(finished, pad_id)
        yield token, logprob
        finished |= torch.isin(token, stops)
        if step == settings.max_new_tokens - 1 or bool(finished.all()):
            return
        logits = decoder.step(token)


def decode(
    decoder: Decoder,
    query: Tensor,
    query_mask: Tensor,
    settings: SamplingSettings,
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator | None,
) -> Sequences:
    """Sample a whole batch through `decoder` (see decode_steps)."""
    steps = list(
        decode_steps(
            decoder, query, query_mask, settings, stop_ids=stop_ids, pad_id=pad_id, generator=generator
        )
    )
    tokens = torch.stack([token for token, _ in steps], dim=1)
    logprobs = torch.stack([logprob for _, logprob in steps], dim=1)
    return finish(query, query_mask, tokens, logprobs, stop_ids, pad_id)
