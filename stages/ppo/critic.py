"""The value model and the reward model, answering "values and scores of these responses".

They live together because they share a trunk. InstructGPT initialises the value model from the reward
model, so with LoRA (the default) the critic is the reward model's trunk with a fresh adapter and a
trainable copy of its score head, and the reward model is the same trunk with the adapter disabled
(original head included): two roles, one copy in memory. Both report in the reward artifact's
standardised units, (raw - reward_mean) / reward_std, values at every response position and the score
at each response's last token.

Two speed-ups trade a less flexible value function for time, each its own implementation:

- `critic_layers: N` (TrunkCritic with shared layers): the adapter covers the top N layers; the layers
  below are the reward model's, so `prepare` runs them once per rollout and the score, the values and
  every update start from their output, costing N layers instead of all.
- `critic: head` (HeadCritic): no trunk of its own: a trainable linear head (initialised as the reward
  head) reads the frozen reward model's last hidden states, which scoring computes anyway; the value
  model then costs no forward or backward pass at all.

With `advantage: rloo` there is no value model: RewardOnly is the frozen reward model and scores alone.

`net` is the module Accelerate prepares (and DDP wraps): value passes with a gradient go through it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from pipeline.generation import Sequences
from pipeline.models import (
    LoraSettings,
    ModelError,
    ResolvedModel,
    apply_lora,
    disable_dropout,
    load_reward_model,
    training_dtype,
    transformers_model,
    write_card,
)
from pipeline.packed_attention import use_packed_attention
from pipeline.store import ArtifactStore
from stages.ppo.passes import Shared, hidden_from, last_token, model_hidden, response_slice, shared_bottom
from stages.ppo.policy import shared_layer_count


class Critic(Protocol):
    """Values (trained) and reward-model scores (frozen) of rollouts, in standardised reward units."""

    net: nn.Module

    def prepare(self, seq: Sequences) -> Shared:
        """What every later pass over these rollouts shares."""
        ...

    def values(self, seq: Sequences, shared: Shared) -> Tensor:
        """V(prefix) before each response token [B, R], with a gradient through `net`."""
        ...

    def scores(self, seq: Sequences, shared: Shared) -> Tensor:
        """The reward model's standardised score of each response [B]."""
        ...

    def prepared(self, net: nn.Module) -> Critic:
        """The same critic with `net` replaced by Accelerate's wrapper of it."""
        ...

    def save(self, folder: Path, *, base: str, adapter: bool) -> None:
        """The trained value model, loadable on its own; `base` names the model source it was built on,
        `adapter` whether what is saved is an adapter on it. Its card gives the units."""
        ...


@dataclass(frozen=True)
class Units:
    """Standardised reward units: (raw - mean) / std, with the reward artifact's mean and std."""

    mean: float = 0.0
    std: float = 1.0

    def of(self, head: nn.Module, hidden: Tensor) -> Tensor:
        """A one-output head on hidden states [..., H], in these units: [...]."""
        return (head(hidden).squeeze(-1).float() - self.mean) / self.std


class ValueNet(nn.Module):
    """A sequence classifier's one-output head read at every position: values [B, R]."""

    def __init__(self, classifier: nn.Module, shared_layers: int, units: Units):
        super().__init__()
        self.classifier = classifier
        self.shared_layers = shared_layers
        self.units = units

    def forward(self, seq: Sequences, shared: Shared) -> Tensor:
        hidden = hidden_from(self.classifier, seq, shared.hidden, self.shared_layers)
        return self.units.of(transformers_model(self.classifier).score, response_slice(hidden, seq))


class TrunkCritic:
    """A value model with a trunk of its own: the reward model's with an adapter, or a separate one."""

    def __init__(
        self,
        classifier: nn.Module,
        reward: nn.Module | None,
        *,
        shared_layers: int,
        value_units: Units,
        reward_units: Units,
    ):
        self.net = ValueNet(classifier, shared_layers, value_units)
        self.classifier = classifier
        """The unwrapped value model (peft classifier with LoRA, or every weight trained)."""
        self.reward = reward
        """A frozen reward model, or None: the classifier with its adapter disabled."""
        self.shared_layers = shared_layers
        self.value_units, self.reward_units = value_units, reward_units

    def prepared(self, net: nn.Module) -> TrunkCritic:
        self.net = net
        return self

    def prepare(self, seq: Sequences) -> Shared:
        return Shared(shared_bottom(self.classifier, seq, self.shared_layers))

    def values(self, seq: Sequences, shared: Shared) -> Tensor:
        return self.net(seq, shared)

    @torch.no_grad()
    def scores(self, seq: Sequences, shared: Shared) -> Tensor:
        with self.as_reward() as reward:  # a separate reward model (no LoRA) never shares layers
            hidden = hidden_from(reward, seq, shared.hidden, self.shared_layers)
            return self.reward_units.of(transformers_model(reward).score, last_token(hidden, seq))

    @contextmanager
    def as_reward(self) -> Iterator[nn.Module]:
        if self.reward is not None:
            yield self.reward
        else:
            with self.classifier.disable_adapter():
                yield self.classifier

    def save(self, folder: Path, *, base: str, adapter: bool) -> None:
        self.classifier.save_pretrained(folder)
        card = {"kind": "reward", "value_model": True, "trunk": base} | (
            {"adapter_base": base} if adapter else {}
        )
        write_card(folder, card | {"reward_mean": self.value_units.mean, "reward_std": self.value_units.std})


class ValueHead(nn.Module):
    """A trainable linear value read-out of a frozen trunk's hidden states, standardised."""

    def __init__(self, weight: Tensor, units: Units):
        super().__init__()
        self.score = nn.Linear(weight.shape[1], 1, bias=False, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.score.weight.copy_(weight)
        self.units = units

    def forward(self, hidden: Tensor) -> Tensor:
        return self.units.of(self.score, hidden)


class RewardOnly:
    """The frozen reward model alone, for advantages that need no value model (advantage: rloo): `net` is
    None, and there is nothing to train or save."""

    net = None

    def __init__(self, reward: nn.Module, *, units: Units):
        self.reward = reward
        self.units = units

    @torch.no_grad()
    def prepare(self, seq: Sequences) -> Shared:
        """One reward-trunk pass: the input of the score (and of a value head, below)."""
        return Shared(model_hidden(self.reward, seq.input_ids, seq.attention_mask))

    @torch.no_grad()
    def scores(self, seq: Sequences, shared: Shared) -> Tensor:
        return self.units.of(transformers_model(self.reward).score, last_token(shared.hidden, seq))


class HeadCritic(RewardOnly):
    """A value head on the frozen reward model's last hidden states (critic: head)."""

    def __init__(self, reward: nn.Module, *, units: Units):
        super().__init__(reward, units=units)
        self.net = ValueHead(transformers_model(reward).score.weight.detach(), units)
        self.head = self.net
        """The unwrapped head, for saving."""

    def prepared(self, net: nn.Module) -> HeadCritic:
        self.net = net
        return self

    def values(self, seq: Sequences, shared: Shared) -> Tensor:
        return self.net(response_slice(shared.hidden, seq))

    def save(self, folder: Path, *, base: str, adapter: bool) -> None:
        folder.mkdir(parents=True)
        weight = self.head.score.weight.detach().cpu().contiguous()
        save_file({"weight": weight}, str(folder / "value_head.safetensors"))
        card = {"kind": "value_head", "value_model": True, "trunk": base}
        write_card(folder, card | {"reward_mean": self.units.mean, "reward_std": self.units.std})


def load_critic(
    reward_source: ResolvedModel,
    sft: ResolvedModel,
    store: ArtifactStore,
    *,
    kind: str,
    value_init: str,
    lora: LoraSettings,
    critic_layers: int,
    pad_id: int,
    device: torch.device,
) -> TrunkCritic | HeadCritic:
    """The value model and the reward model for `kind` (trunk | head) and `value_init` (reward | policy)."""
    dtype = training_dtype(device)
    units = reward_units(reward_source)
    rm = classifier(reward_source, store, dtype, pad_id)
    if critic_layers and (kind == "head" or value_init != "reward" or not lora.enabled):
        raise ModelError(
            "critic_layers shares the reward model's bottom layers with a value model that is its adapter, "
            "so it needs critic: trunk, value_init: reward and LoRA; set critic_layers: 0"
        )
    if kind == "head":
        critic: TrunkCritic | HeadCritic = HeadCritic(frozen(rm), units=units)
    elif value_init == "reward":
        shared = shared_layer_count(rm, critic_layers, "critic_layers")
        reward = None if lora.enabled else frozen(copy.deepcopy(rm))
        layers = list(range(shared, rm.config.num_hidden_layers)) if shared else None
        adapted = apply_lora(rm, lora, "SEQ_CLS", layers)
        critic = TrunkCritic(
            adapted.train(), reward, shared_layers=shared, value_units=units, reward_units=units
        )
    else:  # the SFT trunk with a zero head: V = 0 everywhere until the value loss says otherwise
        values = classifier(sft, store, dtype, pad_id)
        nn.init.zeros_(transformers_model(values).score.weight)
        adapted = apply_lora(values, lora, "SEQ_CLS")
        critic = TrunkCritic(
            adapted.train(), frozen(rm), shared_layers=0, value_units=Units(), reward_units=units
        )
    for model in (critic.net, critic.reward):
        if model is not None:
            disable_dropout(model)
            model.to(device)
    return critic


def load_reward_only(
    reward_source: ResolvedModel, store: ArtifactStore, *, pad_id: int, device: torch.device
) -> RewardOnly:
    """The frozen reward model, scoring in its standardised units, with no value model beside it."""
    rm = classifier(reward_source, store, training_dtype(device), pad_id)
    return RewardOnly(frozen(rm).to(device), units=reward_units(reward_source))


def reward_units(reward_source: ResolvedModel) -> Units:
    """The units the reward artifact's card gives for standardising its raw scores."""
    return Units(
        float(reward_source.card.get("reward_mean", 0.0)),
        float(reward_source.card.get("reward_std", 1.0)) or 1.0,
    )


def classifier(source: ResolvedModel, store: ArtifactStore, dtype: torch.dtype, pad_id: int) -> nn.Module:
    model = load_reward_model(source, store, dtype)
    use_packed_attention(model)
    model.config.pad_token_id = pad_id
    return model


def frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()
