"""Batched rollouts: sample responses with the KV cache, then score them token by token.

Sequences are laid out as [left-padded prompt | response, right-padded after its stop token]. Position
ids come from the attention mask's cumulative sum, so a left-padded prompt sees the same positions as
it would alone. Logits are divided by the sampling temperature everywhere (sampling, rollout log-probs,
update log-probs), so the log-probs are those of the distribution the tokens were actually drawn from.
The passes over finished sequences (reference, values, scores, updates) pack the real tokens into one
row (Packed) where the model's attention can keep them apart, so padding costs them nothing.

Generation runs our own decode loop rather than `generate`: it draws from an explicit `torch.Generator`
(saved in checkpoints, so a resumed run samples the same tokens), stops as soon as every row has ended,
and skips `generate`'s per-step logits processors. `generation_weights` gives it the fastest decoder
for the model (stages.ppo.decode): merged LoRA weights, laid out for our CPU matmul kernel there.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from pipeline.packed_attention import PACKED_SDPA
from stages.ppo.decode import (
    LlamaDecoder,
    TransformersDecoder,
    effective_weight,
    hf_model,
    is_llama,
    packable,
    position_ids,
    read_only_linear,
)
from stages.ppo.panel_linear import SpareTensors
from stages.ppo.rl import logprobs_and_entropy

Decoder = LlamaDecoder | TransformersDecoder


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
    """[B, R] log-probs of the sampled tokens under the sampling distribution (logits / temperature)."""

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)

    def select(self, index: Tensor) -> Sequences:
        fields = (self.query, self.query_mask, self.response, self.response_mask, self.ended, self.logprobs)
        return Sequences(*(t[index] for t in fields))


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


@torch.no_grad()
def sample(
    model: nn.Module | Decoder,
    query: Tensor,
    query_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    stop_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator | None,
) -> Sequences:
    """Sample up to `max_new_tokens` per row with the KV cache; temperature 0 means greedy.

    `model` is a decoder from `generation_weights`, or a model to decode through its own forward.
    The log-probs of the sampled tokens come from the same logits, as the rollout log-probs PPO's ratio
    starts from: a recomputing forward pass would cost as much as scoring the batch once more, for a
    difference of float rounding (merged vs adapter weights, cached vs full attention).
    """
    decoder = TransformersDecoder(model) if isinstance(model, nn.Module) else model
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=query.device)
    logits = decoder.prefill(query, query_mask, max_new_tokens)
    finished = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        logits = logits.float()
        token, logprob = pick(logits / (temperature or 1.0), temperature, generator)
        logprobs.append(logprob)
        token = token.masked_fill(finished, pad_id)
        tokens.append(token)
        finished |= torch.isin(token, stops)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = decoder.step(token)
    response, response_mask, ended = truncate_at_stop(torch.stack(tokens, dim=1), stop_ids, pad_id)
    return Sequences(
        query, query_mask, response, response_mask, ended, torch.stack(logprobs, dim=1) * response_mask
    )


def pick(
    scaled_logits: Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """A token per row from logits already divided by the temperature (greedy at temperature 0), and its
    log-prob under softmax(scaled_logits)."""
    probs = torch.softmax(scaled_logits, dim=-1)
    token = scaled_logits.argmax(-1) if temperature == 0 else inverse_cdf(probs, generator)
    return token, probs.gather(1, token[:, None]).squeeze(1).log()


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


# Per model, the panels (stages.ppo.panel_linear) its last decoder laid its weights out in: kept between
# rollouts, one more copy of the weights in memory, so that each rollout skips the page faults of fresh ones.
SPARE_PANELS: weakref.WeakKeyDictionary[nn.Module, list[Tensor]] = weakref.WeakKeyDictionary()


@contextmanager
def generation_weights(model: nn.Module, rows_hint: int = 8) -> Iterator[Decoder]:
    """The model in its fastest form for generation, as a decoder for `sample`; afterwards it is as before.

    A Llama decodes with LlamaDecoder, built from the weights with any active LoRA adapter merged in.
    Other models decode through their own forward, with every LoRA layer running on the merged matrix
    W + BA (no adapter matmuls per token) and, on CPU, every linear layer swapped for a read-only one
    over a pre-packed copy (stages.ppo.decode.read_only_linear).
    Unlike peft's merge_adapter()/unmerge_adapter(), nothing is ever subtracted back: W + BA - BA would
    round differently from W and slowly drift the frozen reference the KL penalty is measured against
    (and break exact resume). Either way the price is one extra copy of the linear weights while
    generating (between rollouts too, where a Llama's go through the panel kernel: SPARE_PANELS); the
    originals stay untouched.
    """
    hf = hf_model(model)
    if is_llama(hf):
        # The last decoder's weight layout is packed into again (taken, so a nested call makes its own).
        spare = SpareTensors(SPARE_PANELS.pop(hf, None))
        with torch.no_grad():
            decoder = LlamaDecoder(hf, rows_hint, spare)
        yield decoder
        SPARE_PANELS[hf] = decoder.panel_tensors() + spare.unused()
        return
    lora_layers = (
        [m for m in model.modules() if isinstance(m, LoraLayer)] if isinstance(model, PeftModel) else []
    )
    pack = packable(next(model.parameters()))
    swaps: list[tuple[object, str, object]] = []  # (owner, attribute, original value), undone in reverse

    def swap(owner: object, attribute: str, value: object) -> None:
        swaps.append((owner, attribute, getattr(owner, attribute)))
        setattr(owner, attribute, value)

    try:
        with torch.no_grad():
            owned = {id(sub) for layer in lora_layers for sub in layer.modules()}
            plain = [
                (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in owned
            ]
            for layer in lora_layers:
                merged, bias = effective_weight(layer)
                if pack:
                    swap(layer, "base_layer", read_only_linear([merged], bias, rows_hint))
                else:
                    swap(layer.get_base_layer().weight, "data", merged)
            for name, linear in plain if pack else []:
                parent, _, child = name.rpartition(".")
                frozen = read_only_linear([linear.weight], linear.bias, rows_hint)
                swap(model.get_submodule(parent), child, frozen)
        if lora_layers:
            with model.disable_adapter():
                yield TransformersDecoder(model)
        else:
            yield TransformersDecoder(model)
    finally:
        for owner, attribute, original in reversed(swaps):
            setattr(owner, attribute, original)


def response_logits(model: nn.Module, seq: Sequences, lower: Lower | None = None) -> Tensor:
    """Logits [B, R, V] at the positions that predict each response token.

    `lower`: the output of the model's shared bottom layers for `seq`; only the layers above run.
    """
    mask = seq.attention_mask
    length, response_length = mask.shape[1], seq.response.shape[1]
    # Only these positions reach the lm_head, never the prompt. Positions as a tensor (not a count) make
    # transformers gather them into a contiguous block: a strided slice turns the vocabulary projection
    # into a batched matmul over an expanded weight, half again slower on CPU.
    keep = torch.arange(length - response_length - 1, length - 1, device=mask.device)
    with from_lower(lower, seq.input_ids) as inputs:
        if not packs(model):
            return model(**inputs, **padded_inputs(mask), logits_to_keep=keep, use_cache=False).logits.float()
        packed = Packed.of(mask)
        logits = model(
            **packed.pack_all(inputs),
            **packed.inputs,
            logits_to_keep=packed.index(keep).flatten(),
            use_cache=False,
        ).logits
    return logits.view(mask.shape[0], response_length, -1).float()


def response_logprobs(
    model: nn.Module, seq: Sequences, temperature: float, lower: Lower | None = None
) -> Tensor:
    """log p(response token | prefix) [B, R] at the sampling temperature."""
    return logprobs_and_entropy(response_logits(model, seq, lower), seq.response, temperature)[0]


# -- padding-free passes ------------------------------------------------------------------------------


@dataclass
class Packed:
    """A left-padded batch's real tokens laid end to end in one row, each sequence attending only to itself.

    Prompts in a batch differ in length, so a padded batch of rollouts is a quarter to a half padding. The
    passes over finished sequences (reference, values, scores, the PPO updates) run on the real tokens
    only, with pipeline.packed_attention, and their outputs go back to the padded layout.
    """

    where: Tensor
    """[N] row-major positions of the real tokens in the padded [B, L] batch."""
    shape: tuple[int, int]
    inputs: dict[str, object]
    """Position ids and sequence boundaries for the model's forward."""

    @classmethod
    def of(cls, attention_mask: Tensor) -> Packed:
        real = attention_mask.bool()
        lengths = real.sum(-1)
        bounds = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=real.device)
        bounds[1:] = lengths.cumsum(0)
        where = real.flatten().nonzero().squeeze(-1)
        longest = int(lengths.max())
        inputs = {
            "position_ids": position_ids(attention_mask).flatten()[where].unsqueeze(0),
            "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest,
        }  # fmt: skip
        return cls(where, (real.shape[0], real.shape[1]), inputs)

    def pack(self, x: Tensor) -> Tensor:
        """[B, L, ...] -> [1, N, ...]."""
        return x.flatten(0, 1)[self.where].unsqueeze(0)

    def pack_all(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: self.pack(value) for key, value in inputs.items()}

    def unpack(self, y: Tensor) -> Tensor:
        """[1, N, ...] -> [B, L, ...], zeros at the padding."""
        out = y.new_zeros(self.shape[0] * self.shape[1], *y.shape[2:])
        return out.index_copy(0, self.where, y[0]).view(*self.shape, *y.shape[2:])

    def index(self, columns: Tensor) -> Tensor:
        """[B, C] packed positions of the padded columns `columns` of each row (a padding position maps to
        the real token before it, whose output the caller masks out)."""
        rows, length = self.shape
        padded = torch.zeros(rows * length, dtype=torch.long, device=self.where.device)
        padded[self.where] = 1
        return (padded.cumsum(0) - 1).clamp(min=0).view(rows, length)[:, columns]


def packs(model: nn.Module) -> bool:
    """Whether the model's attention keeps the sequences of a packed row apart."""
    return hf_model(model).config._attn_implementation in (
        PACKED_SDPA,
        "flash_attention_2",
        "flash_attention_3",
    )


def padded_inputs(attention_mask: Tensor) -> dict[str, Tensor]:
    return {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}


def trunk_hidden(trunk: nn.Module, inputs: dict[str, Tensor], attention_mask: Tensor) -> Tensor:
    """A decoder stack's last hidden states [B, L, H] over a left-padded batch (packed where it can)."""
    if not packs(trunk):
        return trunk(**inputs, **padded_inputs(attention_mask), use_cache=False).last_hidden_state
    packed = Packed.of(attention_mask)
    return packed.unpack(trunk(**packed.pack_all(inputs), **packed.inputs, use_cache=False).last_hidden_state)


# -- shared bottom layers ----------------------------------------------------------------------------


@dataclass
class Lower:
    """The output of a trunk's bottom `layers` layers, which carry no adapter (frozen, so shared).

    A model with LoRA on its top layers only computes the same bottom whether its adapter is on or off:
    the policy and the reference share it, and so do the value model and the reward model. It is run
    once per rollout; every later pass over the same sequences starts from it and runs the layers above.
    """

    hidden: Tensor
    """[B, L, H] hidden states after the bottom layers (before any final norm)."""
    layers: int
    trunk: nn.Module
    """The transformers decoder stack (model.model) whose layers run above `layers`."""

    def select(self, rows: Tensor, columns: slice) -> Lower:
        return Lower(self.hidden[rows][:, columns], self.layers, self.trunk)


def splittable(model: nn.Module) -> bool:
    """A decoder stack layer_range can cut: Llama's forward takes inputs_embeds as they are."""
    return hf_model(model).config.model_type == "llama"


@torch.no_grad()
def lower_layers(model: nn.Module, layers: int, input_ids: Tensor, attention_mask: Tensor) -> Lower:
    """Run a causal LM's or classifier's bottom `layers` layers once: the Lower its later passes share."""
    trunk = hf_model(model).base_model
    with layer_range(trunk, slice(0, layers), final_norm=False):
        hidden = trunk_hidden(trunk, {"input_ids": input_ids}, attention_mask)
    return Lower(hidden, layers, trunk)


@contextmanager
def from_lower(lower: Lower | None, input_ids: Tensor) -> Iterator[dict[str, Tensor]]:
    """The model's inputs: the token ids, or `lower`'s hidden states with only the layers above it live."""
    if lower is None:
        yield {"input_ids": input_ids}
        return
    with layer_range(lower.trunk, slice(lower.layers, None)):
        yield {"inputs_embeds": lower.hidden}


@contextmanager
def layer_range(trunk: nn.Module, layers: slice, final_norm: bool = True) -> Iterator[None]:
    """Make `trunk` (a transformers decoder stack) run only `trunk.layers[layers]` while inside.

    Its input is then the hidden state before the first of them, passed as `inputs_embeds`.
    """
    full, norm = trunk.layers, trunk.norm
    trunk.layers = nn.ModuleList(list(full)[layers])
    if not final_norm:
        trunk.norm = nn.Identity()
    try:
        yield
    finally:
        trunk.layers, trunk.norm = full, norm


class TokenValues(nn.Module):
    """A sequence classifier's one-output score head applied at every position: [B, L] values.

    The critic is a reward model (InstructGPT) or the policy's trunk with a new head; reading the head at
    every position gives V(prefix), and at the last response token it is the reward model's score.
    Outputs are in standardised reward units, (raw - mean) / std.

    `shared_layers`: the bottom layers that carry no adapter, which the value model shares with the
    reward model (see Lower): `lower()` runs them, `forward(..., lower=)` runs the layers above.
    """

    def __init__(self, classifier: nn.Module, mean: float = 0.0, std: float = 1.0, shared_layers: int = 0):
        super().__init__()
        self.classifier = classifier
        self.mean, self.std = mean, std
        self.shared_layers = shared_layers

    def lower(self, input_ids: Tensor, attention_mask: Tensor) -> Lower:
        return lower_layers(self.classifier, self.shared_layers, input_ids, attention_mask)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor, lower: Lower | None = None) -> Tensor:
        """The trunk's last hidden states [B, L, H]."""
        with from_lower(lower, input_ids) as inputs:
            return trunk_hidden(hf_model(self.classifier).base_model, inputs, attention_mask)

    def head(self, hidden: Tensor) -> Tensor:
        return (hf_model(self.classifier).score(hidden).squeeze(-1).float() - self.mean) / self.std

    def forward(self, input_ids: Tensor, attention_mask: Tensor, lower: Lower | None = None) -> Tensor:
        return self.head(self.hidden(input_ids, attention_mask, lower))


class ValueHead(nn.Module):
    """A trainable linear value read-out of a frozen trunk's hidden states, in standardised reward units."""

    def __init__(self, weight: Tensor, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.score = nn.Linear(weight.shape[1], 1, bias=False, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.score.weight.copy_(weight)
        self.mean, self.std = mean, std

    def forward(self, hidden: Tensor) -> Tensor:
        return (self.score(hidden).squeeze(-1).float() - self.mean) / self.std


def response_slice(per_position: Tensor, seq: Sequences) -> Tensor:
    """The entries at the positions that predict each response token (the state before it): [B, R, ...]."""
    return per_position[:, seq.query.shape[1] - 1 : -1]


def last_token(per_position: Tensor, seq: Sequences) -> Tensor:
    """The entry at each response's last kept token (its stop token when it has one): [B, ...]."""
    last = seq.query.shape[1] + (seq.response_mask.sum(-1).long() - 1).clamp(min=0)
    return per_position[torch.arange(per_position.shape[0], device=per_position.device), last]


def response_values(critic: nn.Module, seq: Sequences, lower: Lower | None = None) -> Tensor:
    """V(prefix) before each response token: [B, R]. `lower`: see TokenValues."""
    return response_slice(critic(seq.input_ids, seq.attention_mask, lower=lower), seq)


def last_token_scores(scorer: nn.Module, seq: Sequences) -> Tensor:
    """The score head's output at each response's last kept token: [B]."""
    return last_token(scorer(seq.input_ids, seq.attention_mask), seq)
