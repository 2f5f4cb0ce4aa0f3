"""The reward of a sequence: the score head applied to the trunk's hidden state at its last real token.

Shared by the reward stage (training, `rlhf reward score`), PPO's judge and the app (a score beside
each chat reply), so a score is the same number wherever a person sees it.

The index of that token comes from the attention mask, not from searching for pad tokens (a pad id can
legitimately occur inside a text), and position ids count real tokens only, so a sequence scores the
same whether the batch pads it on the left or the right, and whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.chat import Message, tokenize_completion
from pipeline.models import ModelError, load_reward_model, load_tokenizer, resolve_model
from pipeline.packed_attention import SharedPrefixRow
from pipeline.store import ArtifactStore


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last attended token, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(dim=1)


class RewardScorer(nn.Module):
    """Wraps a sequence classifier (optionally a peft model) so that one forward returns one score per row.

    Accelerate prepares this module, so distributed wrappers see every forward call.
    """

    def __init__(self, model: PreTrainedModel | PeftModel):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        shared_prefix: SharedPrefixRow | None = None,
    ) -> Tensor:
        """Scores [rows] of a right- or left-padded batch, or [sequences] of a `SharedPrefixRow` (which
        needs the model's attention to be `packed_sdpa`: pipeline.packed_attention)."""
        classifier = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        if shared_prefix is not None:
            hidden = classifier.base_model(
                input_ids=shared_prefix.input_ids,
                position_ids=shared_prefix.position_ids,
                shared_prefix=shared_prefix,
                use_cache=False,
            ).last_hidden_state
            return classifier.score(hidden[0, shared_prefix.last]).squeeze(-1).float()
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = classifier.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        rows = torch.arange(len(input_ids), device=input_ids.device)
        last = hidden[rows, last_token_index(attention_mask)]
        # Only the last token's hidden state goes through the head; scores are fp32 for the loss.
        return classifier.score(last).squeeze(-1).float()


@torch.no_grad()
def score_completions(
    scorer: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[Message],
    completions: Sequence[str],
    max_length: int,
) -> list[float]:
    """Raw rewards of `completions` to one prompt, tokenized exactly as in training."""
    rows = [tokenize_completion(tokenizer, prompt, c, max_length).input_ids for c in completions]
    input_ids, attention_mask = pad_right(rows, tokenizer.pad_token_id)
    device = next(scorer.parameters()).device
    return scorer(input_ids.to(device), attention_mask.to(device)).tolist()


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


@dataclass
class LoadedRewardModel:
    """A reward artifact ready to score: the scorer, its tokenizer, and the statistics it normalises with."""

    artifact_id: str | None
    scorer: RewardScorer
    tokenizer: PreTrainedTokenizerBase
    mean: float
    """Mean raw score over the SFT demonstrations (the artifact's reward_mean)."""
    std: float
    """Their standard deviation (reward_std): normalised = (raw - mean) / std."""
    max_length: int
    """Prompt + completion tokens it was trained on; longer prompts are cut on the left."""

    def score(self, prompt: Sequence[Message], completions: Sequence[str]) -> list[float]:
        """Raw scores of `completions` to `prompt`, tokenized exactly as in training."""
        return score_completions(self.scorer, self.tokenizer, prompt, completions, self.max_length)

    def normalise(self, raw: float) -> float:
        """0 is "as good as a typical demonstration", 1 is one standard deviation better."""
        return (raw - self.mean) / self.std


def load_reward(source: str, store: ArtifactStore) -> LoadedRewardModel:
    """A reward artifact (or folder) as a scorer; anything that is not a reward model is refused."""
    resolved = resolve_model(source, store)
    card = resolved.card
    if card.get("kind") != "reward":
        raise ModelError(
            f"{source} is not a reward model (its model card says {card.get('kind')!r}); name a reward "
            "artifact: reward:latest, or an id from `rlhf artifacts ls --stage reward`"
        )
    scorer = RewardScorer(load_reward_model(resolved, store)).eval()
    return LoadedRewardModel(
        artifact_id=resolved.lineage.get("artifact"),
        scorer=scorer,
        tokenizer=load_tokenizer(resolved.path),
        mean=float(card["reward_mean"]),
        std=float(card["reward_std"]) or 1.0,
        max_length=int(card["max_length"]),
    )
