"""Forward passes over finished rollouts: padding-free, and from a shared bottom layer's output upward.

Two things make the passes after sampling (reference, values, scores, and every update) cheaper:

- Packing. A batch of rollouts is left-padded to its longest prompt, so a quarter to a half of it is
  padding. `Packed` lays the real tokens end to end in one row, pipeline.packed_attention keeps the
  sequences apart, and the outputs go back to the padded layout.
- Shared bottom layers. When only the top layers of a trunk carry a LoRA adapter, the layers below
  compute the same thing with the adapter on or off: the policy shares them with the reference, and the
  value model with the reward model. `trunk_hidden(..., layers=slice(0, k))` runs them once per rollout;
  later passes start from that output with `layers=slice(k, None)`. The layer loop is written out here
  (the decoder layers are called one by one, nothing in the model is swapped), so it is Llama's;
  `splittable` says which models it serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask

from pipeline.generation import Sequences, position_ids
from pipeline.models import transformers_model
from pipeline.packed_attention import PACKED_SDPA


@dataclass
class Packed:
    """A left-padded batch's real tokens laid end to end in one row, each sequence attending only to itself."""

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
            "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds,
            "max_length_q": longest,
            "max_length_k": longest,
        }
        return cls(where, (real.shape[0], real.shape[1]), inputs)

    def pack(self, x: Tensor) -> Tensor:
        """[B, L, ...] -> [1, N, ...]."""
        return x.flatten(0, 1)[self.where].unsqueeze(0)

    def unpack(self, y: Tensor) -> Tensor:
        """[1, N, ...] -> [B, L, ...], zeros at the padding."""
        out = y.new_zeros(self.shape[0] * self.shape[1], *y.shape[2:])
        return out.index_copy(0, self.where, y[0]).view(*self.shape, *y.shape[2:])


def packs(model: nn.Module) -> bool:
    """Whether the model's attention keeps the sequences of a packed row apart."""
    return transformers_model(model).config._attn_implementation in (
        PACKED_SDPA,
        "flash_attention_2",
        "flash_attention_3",
    )


def splittable(model: nn.Module) -> bool:
    """Whether `trunk_hidden` can run a range of this model's layers (the layer loop is Llama's)."""
    return transformers_model(model).config.model_type == "llama"


def trunk_hidden(
    trunk: nn.Module,
    attention_mask: Tensor,
    *,
    input_ids: Tensor | None = None,
    hidden: Tensor | None = None,
    layers: slice = slice(None),
) -> Tensor:
    """Hidden states [B, L, H] of a decoder stack (a causal LM's or classifier's `.model`) over a left-padded
    batch, after `trunk.layers[layers]`: from the token ids when the range starts at 0, else from `hidden`,
    the output of the layers below. The final norm is applied when the range reaches the top.
    """
    start, stop, _ = layers.indices(len(trunk.layers))
    packed = Packed.of(attention_mask) if packs(trunk) else None
    x = trunk.embed_tokens(input_ids) if start == 0 else hidden
    if packed is None:
        positions = position_ids(attention_mask)
        extra = {
            "attention_mask": create_causal_mask(
                config=trunk.config,
                inputs_embeds=x,
                attention_mask=attention_mask,
                cache=None,
                position_ids=positions,
            )
        }
    else:
        x = packed.pack(x)
        positions = packed.inputs["position_ids"]
        extra = {"attention_mask": None} | {k: v for k, v in packed.inputs.items() if k != "position_ids"}
    rotary = trunk.rotary_emb(x, position_ids=positions)
    for layer in trunk.layers[start:stop]:
        x = layer(x, position_embeddings=rotary, position_ids=positions, use_cache=False, **extra)
    if stop == len(trunk.layers):
        x = trunk.norm(x)
    return x if packed is None else packed.unpack(x)


def model_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The last hidden states [B, L, H] of any transformers model, through its own forward (packed where
    its attention allows)."""
    trunk = transformers_model(model).base_model
    if not packs(trunk):
        return trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        ).last_hidden_state
    packed = Packed.of(attention_mask)
    out = trunk(input_ids=packed.pack(input_ids), **packed.inputs, use_cache=False).last_hidden_state
    return packed.unpack(out)


def hidden_from(model: nn.Module, seq: Sequences, lower: Tensor | None, shared_layers: int) -> Tensor:
    """The model's last hidden states for `seq`: from `lower` (the output of its `shared_layers` bottom
    layers) when given, else from the token ids."""
    if lower is None:
        return model_hidden(model, seq.input_ids, seq.attention_mask)
    trunk = transformers_model(model).base_model
    return trunk_hidden(trunk, seq.attention_mask, hidden=lower, layers=slice(shared_layers, None))


@torch.no_grad()
def shared_bottom(model: nn.Module, seq: Sequences, layers: int) -> Tensor | None:
    """The output of the model's bottom `layers` layers for `seq` (None when it shares none)."""
    if not layers:
        return None
    trunk = transformers_model(model).base_model
    return trunk_hidden(trunk, seq.attention_mask, input_ids=seq.input_ids, layers=slice(0, layers))


def response_slice(per_position: Tensor, seq: Sequences) -> Tensor:
    """The entries at the positions that predict each response token (the state before it): [B, R, ...]."""
    return per_position[:, seq.query.shape[1] - 1 : -1]


def last_token(per_position: Tensor, seq: Sequences) -> Tensor:
    """The entry at each response's last kept token (its stop token when it has one): [B, ...]."""
    last = seq.query.shape[1] + (seq.response_mask.sum(-1).long() - 1).clamp(min=0)
    return per_position[torch.arange(per_position.shape[0], device=per_position.device), last]


@dataclass
class Shared:
    """What every later pass over a batch of rollouts can start from: the hidden states [B, L, H] of the
    layers a model shares with its frozen partner, or nothing."""

    hidden: Tensor | None = None

    def select(self, rows: Tensor, columns: slice) -> Shared:
        return Shared(None if self.hidden is None else self.hidden[rows][:, columns])
