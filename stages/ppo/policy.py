"""The policy and its frozen reference (the SFT model), answering "log-probs of these responses".

With LoRA (the default) they are one trunk: the policy is the SFT model with a fresh adapter, and the
reference is the same model with the adapter disabled (peft's `disable_adapter()`), so there is no
second copy. With `policy_layers: N` the adapter covers only the top N layers: the layers below are the
SFT model's for both, so `prepare` runs them once per rollout and the reference pass and every update
start from their output (passes.Shared). Without LoRA the reference is a separate frozen copy.

`net` is the module Accelerate prepares (and DDP wraps): every pass that needs a gradient goes through
its forward, so gradients are reduced across processes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from pipeline.generation import Sequences
from pipeline.models import (
    LoraSettings,
    ModelError,
    ResolvedModel,
    apply_lora,
    disable_dropout,
    load_causal_lm,
    match_vocab,
    top_layer_indices,
    training_dtype,
    transformers_model,
)
from pipeline.packed_attention import use_packed_attention
from pipeline.store import ArtifactStore
from stages.ppo import rl
from stages.ppo.passes import Shared, hidden_from, response_slice, shared_bottom, splittable


class PolicyNet(nn.Module):
    """The policy's forward for gradient steps: logits at the response positions [B, R, V]."""

    def __init__(self, lm: nn.Module, shared_layers: int):
        super().__init__()
        self.lm = lm
        self.shared_layers = shared_layers

    def forward(self, seq: Sequences, shared: Shared) -> Tensor:
        hidden = response_slice(hidden_from(self.lm, seq, shared.hidden, self.shared_layers), seq)
        return transformers_model(self.lm).lm_head(hidden).float()


class Policy:
    """The trained policy and the frozen reference (see the module doc)."""

    def __init__(self, lm: nn.Module, reference: nn.Module | None, shared_layers: int):
        self.net = PolicyNet(lm, shared_layers)
        """The module for gradient steps; `prepared` replaces it with Accelerate's wrapper."""
        self.lm = lm
        """The unwrapped causal LM (peft model with LoRA): the engines sync from it; it is published."""
        self.reference = reference
        """A frozen SFT copy, or None: the policy with its adapter disabled."""
        self.shared_layers = shared_layers

    def prepared(self, net: nn.Module) -> Policy:
        self.net = net
        return self

    def prepare(self, seq: Sequences) -> Shared:
        """What every later pass over these rollouts shares: the output of the shared bottom layers."""
        return Shared(shared_bottom(self.lm, seq, self.shared_layers))

    def logits(self, seq: Sequences, shared: Shared) -> Tensor:
        """The policy's logits at the response positions [B, R, V], with a gradient."""
        return self.net(seq, shared)

    @torch.no_grad()
    def reference_logits(self, seq: Sequences, shared: Shared) -> Tensor:
        """The SFT model's logits at the response positions [B, R, V] (from the shared layers' output when
        the reference shares them)."""
        with self.as_reference() as reference:  # a separate reference (no LoRA) never shares layers
            return PolicyNet(reference, self.shared_layers)(seq, shared)

    @torch.no_grad()
    def reference_logprobs(self, seq: Sequences, shared: Shared, temperature: float) -> Tensor:
        """log p_ref(response token | prefix) [B, R] at the sampling temperature."""
        return rl.logprobs_and_entropy(self.reference_logits(seq, shared), seq.response, temperature)[0]

    @contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        """The module that computes as the reference, while inside (for an engine to sync from)."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.lm.disable_adapter():
                yield self.lm

    @torch.no_grad()
    def current_logits(self, seq: Sequences, shared: Shared) -> Tensor:
        """The policy's logits at the response positions [B, R, V] without a gradient (evaluation), from
        the shared layers' output when given."""
        return PolicyNet(self.lm, self.shared_layers)(seq, shared)


def load_policy_and_reference(
    sft: ResolvedModel,
    store: ArtifactStore,
    tokenizer: PreTrainedTokenizerBase,
    *,
    lora: LoraSettings,
    policy_layers: int,
    device: torch.device,
) -> Policy:
    """The SFT model with a fresh adapter on its top `policy_layers` layers (0: all), and its reference."""
    lm = load_causal_lm(sft, store, training_dtype(device))
    match_vocab(lm, tokenizer)
    use_packed_attention(lm)  # passes over whole rollouts run on their real tokens only (passes.Packed)
    shared = shared_layer_count(lm, policy_layers, "policy_layers")
    reference = None
    if not lora.enabled:
        if policy_layers:
            raise ModelError(
                "policy_layers shares the layers below an adapter with the reference, so it needs LoRA; "
                "set lora.enabled: true or policy_layers: 0"
            )
        reference = copy.deepcopy(lm).requires_grad_(False).eval()
    lm = apply_lora(lm, lora, layers=list(range(shared, lm.config.num_hidden_layers)) if shared else None)
    for model in (lm, reference):
        if model is not None:
            disable_dropout(model)
            model.to(device)
    return Policy(lm.train(), reference, shared)


def shared_layer_count(model: nn.Module, top: int, key: str) -> int:
    """How many bottom layers stay without an adapter when only the `top` ones get one (0: none)."""
    if top == 0:
        return 0
    lowest_adapted = top_layer_indices(model, top, key)[0]
    if not splittable(model):
        raise ModelError(
            f"{key} needs a Llama-architecture model, not {model.config.model_type}; "
            f"set {key}: 0 to adapt every layer"
        )
    return lowest_adapted
