"""Attention over padding-free (packed) batches without a T x T mask, for CPUs and GPUs without flash-attn.

A padding-free batch is one row holding several sequences, with position ids that restart at each
sequence and `cu_seq_lens_q` marking the boundaries (TRL's collator provides both). The stock `sdpa`
path turns that into a dense block-diagonal mask over the whole row, which forces the slow masked
kernel and materialises heads x T x T scores: on a 135M model with 3,000-token rows that is most of
the step time and gigabytes of memory. Here each sequence attends causally on its own slice with the
fused causal kernel, while every linear layer still runs on the whole row.

`SharedPrefixRow` goes one step further for sequences that begin alike, such as a reward model's K
completions of one prompt: each group's common prefix is laid out once, then the rest of every sequence,
and each rest attends to the prefix and to itself. The prompt's tokens then pass through the model once
per group instead of K times; the scores are those of the sequences forwarded one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED_SDPA = "packed_sdpa"


@dataclass(frozen=True)
class SharedPrefixRow:
    """Groups of token sequences in one row, each group's longest common prefix stored once.

    The group [a b c x y], [a b c z] becomes [a b c | x y | z] at positions [0 1 2 | 3 4 | 3]; x and y see
    a b c and each other (causally), z sees a b c and itself. A sequence that is all prefix (a group of
    one, or a sequence the others extend) ends inside the prefix, where its last state is the same.
    Pass `shared_prefix=row` to the forward of a model whose attention is `packed_sdpa`.
    """

    input_ids: torch.Tensor
    """[1, N] token ids."""
    position_ids: torch.Tensor
    """[1, N] each token's position in its own sequence."""
    group_lengths: list[int]
    """Tokens per group, in row order."""
    masks: list[torch.Tensor]
    """Per group, [T, T] bool: True where a query token may attend to a key token."""
    last: torch.Tensor
    """[sequences] where each sequence's last token sits in the row, groups in order."""

    @classmethod
    def of(cls, groups: Sequence[Sequence[Sequence[int]]]) -> SharedPrefixRow:
        ids: list[int] = []
        positions: list[int] = []
        lengths, masks, last = [], [], []
        for rows in groups:
            prefix = common_prefix_length(rows)
            start = len(ids)
            ids += rows[0][:prefix]
            positions += range(prefix)
            spans = []
            for row in rows:
                rest = row[prefix:]
                last.append(len(ids) + len(rest) - 1 if rest else start + len(row) - 1)
                spans.append((len(ids) - start, len(rest)))
                ids += rest
                positions += range(prefix, len(row))
            lengths.append(len(ids) - start)
            masks.append(group_mask(lengths[-1], prefix, spans))
        return cls(
            input_ids=torch.tensor([ids], dtype=torch.long),
            position_ids=torch.tensor([positions], dtype=torch.long),
            group_lengths=lengths,
            masks=masks,
            last=torch.tensor(last, dtype=torch.long),
        )

    def to(self, device: torch.device | str) -> SharedPrefixRow:
        return SharedPrefixRow(
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            group_lengths=self.group_lengths,
            masks=[mask.to(device) for mask in self.masks],
            last=self.last.to(device),
        )


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    shortest = min(len(row) for row in rows)
    for i in range(shortest):
        if any(row[i] != rows[0][i] for row in rows[1:]):
            return i
    return shortest


def group_mask(length: int, prefix: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Who attends to whom in one group: the prefix causally; each (start, size) span to the prefix and,
    causally, to itself."""
    causal = torch.ones(length, length, dtype=torch.bool).tril_()
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:prefix, :prefix] = causal[:prefix, :prefix]
    for start, size in spans:
        rows = slice(start, start + size)
        mask[rows, :prefix] = True
        mask[rows, rows] = causal[:size, :size]
    return mask


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention per packed sequence (causal) or per shared-prefix group (its mask); anything that is not a
    packed row goes to stock sdpa."""
    shared: SharedPrefixRow | None = kwargs.get("shared_prefix")
    boundaries = kwargs.get("cu_seq_lens_q")
    if (shared is None and boundaries is None) or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if shared is not None:
        lengths, masks = shared.group_lengths, shared.masks
    else:
        lengths = boundaries.diff().tolist()
        masks = [None] * len(lengths)
    # split, not a slice per sequence: a slice's backward writes its gradient into a zeroed copy of the
    # whole row, once per sequence per layer; split's backward is one concatenation.
    outputs = [
        scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=mask is None,
            enable_gqa=groups > 1,
        )
        for q, k, v, mask in zip(
            query.split(lengths, dim=2),
            key.split(lengths, dim=2),
            value.split(lengths, dim=2),
            masks,
            strict=True,
        )
        if q.shape[2]
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
# Unpacked batches (evaluation with padding, generation) still need sdpa's mask.
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


def use_packed_attention(model: PreTrainedModel) -> None:
    """Switch a model from stock sdpa to per-sequence attention on packed rows (a no-op for other kernels)."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(PACKED_SDPA)
