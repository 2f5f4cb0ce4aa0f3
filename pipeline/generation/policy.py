"""A chat model ready to answer: for the app's chat, arena and Write tab, and `rlhf label generate`.

The replies come from the same engines stage 3 samples with, rendered with the model's own chat template
and cut at its stop tokens (pipeline.chat), so what a person sees in the app is what PPO optimised.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.chat import Message, prompt_ids, stop_token_ids
from pipeline.generation.engines import Engine, EngineName, make_engine
from pipeline.generation.sampling import SamplingSettings
from pipeline.models import load_causal_lm, load_tokenizer, match_vocab, resolve_model
from pipeline.store import ArtifactStore


@dataclass
class LoadedPolicy:
    """A causal LM, its tokenizer and the engine that samples from it."""

    source: str
    """The model source as given (an artifact reference, a folder, ...)."""
    artifact_id: str | None
    """The artifact it resolved to, for provenance; None for a plain folder or Hub id."""
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    engine: Engine

    def replies(
        self, prompts: Sequence[Sequence[Message]], settings: SamplingSettings, seed: int, batch_size: int = 8
    ) -> list[str]:
        """One reply per conversation (each ending with a user turn), sampled in batches."""
        generator = torch.Generator(self.model.device).manual_seed(seed)
        texts = []
        for start in range(0, len(prompts), batch_size):
            ids = [prompt_ids(self.tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
            seq = self.engine.sample(ids, settings, generator)
            for response, mask in zip(seq.response, seq.response_mask, strict=True):
                texts.append(self.text(response[: int(mask.sum())].tolist()))
        return texts

    def stream(self, messages: Sequence[Message], settings: SamplingSettings, seed: int) -> Iterator[str]:
        """The reply to `messages` as it grows, one string per token (the last is the whole reply)."""
        generator = torch.Generator(self.model.device).manual_seed(seed)
        tokens: list[int] = []
        for token in self.engine.stream(prompt_ids(self.tokenizer, messages), settings, generator):
            tokens.append(token)
            yield self.text(tokens)

    def text(self, tokens: list[int]) -> str:
        # The stop token ends the turn; it is not part of what the assistant said.
        stops = set(stop_token_ids(self.tokenizer))
        return self.tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True).strip()


def load_policy(source: str, store: ArtifactStore, *, engine: EngineName = "auto") -> LoadedPolicy:
    """Load a causal LM from any model source (adapters merged) with an engine synced to its weights."""
    resolved = resolve_model(source, store)
    tokenizer = load_tokenizer(resolved.path)
    model = load_causal_lm(resolved, store).eval()
    match_vocab(model, tokenizer)
    sampler = make_engine(engine, model, stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    sampler.sync(model)
    return LoadedPolicy(source, resolved.lineage.get("artifact"), model, tokenizer, sampler)
