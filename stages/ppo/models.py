"""The four models PPO needs, and how they share trunks: policy, reference, value model (critic), reward.

With LoRA (the default) there are two trunks in memory, not four:

- the SFT trunk carries the policy's fresh adapter; with the adapter disabled (peft's `disable_adapter()`)
  it is the frozen reference, and with the adapter merged it generates (rollout.generation_weights).
  With `policy_layers: N` the adapter covers only the top N layers, and one pass through the layers
  below per rollout serves the reference and every update;
- the reward model's trunk carries the critic's adapter and trainable copy of the score head
  (InstructGPT initialises the value model from the reward model); with the adapter disabled it is the
  frozen reward model, original head included. With `critic_layers: N` the adapter covers only the top
  N layers: the layers below are the reward model's, frozen, so one pass through them per rollout
  serves the score, the values and every update, and the critic's passes cost N layers, not all.

Without LoRA the reference and the reward model are separate frozen copies. With `value_init: policy`
the critic is the SFT trunk with a zero score head (a second copy), and the reward model stands alone.

With `critic: head` the value model has no trunk of its own: a trainable linear head (initialised as
the reward head) reads the frozen reward model's hidden states, which the scoring pass computes anyway.
The value model then costs no forward or backward pass at all, for a value function limited to a
linear read-out of the reward model's features.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from pipeline.models import (
    LoraSettings,
    ModelError,
    ResolvedModel,
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    match_vocab,
    resolve_model,
    training_dtype,
)
from pipeline.packed_attention import use_packed_attention
from pipeline.store import ArtifactStore
from stages.ppo.rollout import (
    Lower,
    Sequences,
    TokenValues,
    ValueHead,
    hf_model,
    last_token,
    splittable,
)


@dataclass
class Models:
    """The trained policy and critic (as prepared by Accelerate) and their frozen partners."""

    policy: nn.Module
    """The policy for gradient steps (wrapped in DDP under several processes)."""
    critic: nn.Module
    """The value model for gradient steps (TokenValues, wrapped like the policy)."""
    policy_model: nn.Module
    """The unwrapped policy: generation and no-grad scoring use it."""
    critic_model: TokenValues | ValueHead
    """The unwrapped value model: a trunk with a head, or a head on the reward model's hidden states."""
    reference: nn.Module | None
    """A frozen SFT copy, or None: the policy with its adapter disabled."""
    reward: TokenValues | None
    """A frozen reward model, or None: the critic with its adapter disabled."""
    policy_shared_layers: int = 0
    """Bottom policy layers without an adapter, which the reference shares (rollout.Lower)."""

    @contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy_model.disable_adapter():
                yield self.policy_model

    @contextmanager
    def as_reward(self) -> Iterator[TokenValues]:
        if self.reward is not None:
            yield self.reward
        else:
            with self.critic_model.classifier.disable_adapter():
                yield self.critic_model

    @property
    def critic_shared_layers(self) -> int:
        """Bottom layers the value model shares, frozen, with the reward model (TokenValues)."""
        return getattr(self.critic_model, "shared_layers", 0)

    @property
    def critic_reads_reward(self) -> bool:
        """The value model is a head on the reward model's hidden states (critic: head)."""
        return isinstance(self.critic_model, ValueHead)

    @torch.no_grad()
    def score(
        self,
        seq: Sequences,
        clip: float,
        missing_eos_penalty: float | None,
        hidden: Tensor | None = None,
        lower: Lower | None = None,
    ) -> Tensor:
        """Standardised reward-model scores [B], clipped to +-clip, minus the penalty for a missing stop.

        `hidden`: the reward trunk's hidden states for `seq`, when the caller has them already; `lower`:
        those of the layers the critic shares (TokenValues).
        """
        with self.as_reward() as reward:
            per_position = (
                reward(seq.input_ids, seq.attention_mask, lower=lower)
                if hidden is None
                else reward.head(hidden)
            )
            scores = last_token(per_position, seq).clamp(-clip, clip)
        if missing_eos_penalty is not None:
            scores = scores - missing_eos_penalty * (~seq.ended).float()
        return scores


@dataclass
class Loaded:
    """What build_models loads, before Accelerate wraps the trained parts."""

    policy: nn.Module
    critic: TokenValues | ValueHead
    reference: nn.Module | None
    reward: TokenValues | None
    sft: ResolvedModel
    reward_source: ResolvedModel
    policy_shared_layers: int = 0


def frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def build_models(
    policy_ref: str,
    reward_ref: str,
    store: ArtifactStore,
    tokenizer: PreTrainedTokenizerBase,
    lora: LoraSettings,
    value_init: str,
    critic_kind: str,
    device: torch.device,
    critic_layers: int = 0,
    policy_layers: int = 0,
) -> Loaded:
    """Load and wrap the four models; `*_layers` > 0 puts the LoRA adapter on the top layers only."""
    dtype = training_dtype(device)
    sft = resolve_model(policy_ref, store)
    policy = load_causal_lm(sft, store, dtype)
    use_packed_attention(policy)  # passes over whole rollouts run on their real tokens only (rollout.Packed)
    match_vocab(policy, tokenizer)
    reference = None if lora.enabled else frozen(copy.deepcopy(policy))
    policy_shared = shared_bottom(policy, policy_layers if lora.enabled else 0, "policy_layers")
    policy = apply_lora(policy, lora, layers=adapted_layers(policy, policy_shared))

    reward_source = resolve_model(reward_ref, store)
    check_same_tokenizer(tokenizer, reward_source.path)
    # Values and scores in the units the reward artifact reports: (raw - reward_mean) / reward_std.
    mean = float(reward_source.card.get("reward_mean", 0.0))
    std = float(reward_source.card.get("reward_std", 1.0)) or 1.0
    rm = load_reward_model(reward_source, store, dtype)
    use_packed_attention(rm)
    rm.config.pad_token_id = tokenizer.pad_token_id
    if critic_kind == "head":
        reward = frozen(TokenValues(rm, mean, std))
        critic = ValueHead(hf_model(rm).score.weight.detach(), mean, std)
    elif value_init == "reward":
        reward = None if lora.enabled else frozen(TokenValues(copy.deepcopy(rm), mean, std))
        shared = shared_bottom(rm, critic_layers if lora.enabled else 0, "critic_layers")
        critic = TokenValues(
            apply_lora(rm, lora, "SEQ_CLS", adapted_layers(rm, shared)), mean, std, shared_layers=shared
        )
    else:
        reward = frozen(TokenValues(rm, mean, std))
        head = load_reward_model(sft, store, dtype)
        use_packed_attention(head)
        head.config.pad_token_id = tokenizer.pad_token_id
        nn.init.zeros_(hf_model(head).score.weight)  # V = 0 everywhere until the value loss says otherwise
        critic = TokenValues(apply_lora(head, lora, task_type="SEQ_CLS"))
    for model in (policy, critic, reference, reward):
        if model is not None:
            disable_dropout(model)
            model.to(device)
    return Loaded(policy.train(), critic.train(), reference, reward, sft, reward_source, policy_shared)


def shared_bottom(model: nn.Module, top: int, key: str) -> int:
    """How many bottom layers stay without an adapter when only the `top` ones get one (0: none)."""
    depth = model.config.num_hidden_layers
    if not 0 < top < depth:
        return 0
    if not splittable(model):
        raise ModelError(
            f"{key} needs a Llama-architecture model, not {model.config.model_type}; "
            f"set {key}: 0 to adapt every layer"
        )
    return depth - top


def adapted_layers(model: nn.Module, shared: int) -> list[int] | None:
    return list(range(shared, model.config.num_hidden_layers)) if shared else None


def check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, rm_path: str) -> None:
    """The reward model must read the policy's token ids as the text it was trained on."""
    theirs = load_tokenizer(rm_path)
    if theirs.get_vocab() != tokenizer.get_vocab() or theirs.chat_template != tokenizer.chat_template:
        raise ModelError(
            f"the reward model at {rm_path} uses another tokenizer or chat template than the policy"
        )
