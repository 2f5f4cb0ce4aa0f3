"""The `hf` engine: transformers' `generate` on the weights of the last sync (any causal LM, any device).

`sync(model)` makes the engine's own inference model current: a plain transformers model without adapter
layers, whose LoRA-adapted linear layers hold W + BA (merged once per sync, so no adapter matmul runs per
token), sharing every other tensor with the model. Nothing is ever merged into the
model and subtracted back (W + BA - BA rounds differently from W, and would slowly drift the frozen
reference the KL penalty is measured against). When the model is sharded (FSDP2, DeepSpeed ZeRO-3) its
parameters are gathered for the sync and the copy owns full tensors: the colocated layout TRL's GRPO
uses with vLLM, where a vLLM engine would take the same gathered weights.

Tokens are drawn by `DrawEachToken`, a logits processor running our own `pick` with the caller's
generator, one uniform number per row per step, so `hf` and the CPU engines draw the same tokens from
the same logits and a checkpointed generator resumes exactly; `generate` then takes that token greedily.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    PreTrainedModel,
    StoppingCriteria,
)
from transformers.generation.streamers import BaseStreamer

from pipeline.generation.sampling import SamplingSettings, Sequences, finish, left_pad, pick
from pipeline.generation.weights import full_parameters, is_sharded, merged_tensors
from pipeline.models import transformers_model


class DrawEachToken(LogitsProcessor):
    """Draws each step's token with `pick` and leaves it the only finite score, for greedy `generate`."""

    def __init__(self, settings: SamplingSettings, generator: torch.Generator | None):
        self.settings, self.generator = settings, generator
        self.logprobs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        token, logprob = pick(scores, self.settings, self.generator)
        self.logprobs.append(logprob)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


class HFEngine:
    """Sampling through `generate` on an inference copy of the model (see the module doc)."""

    name = "hf"

    def __init__(self, model: nn.Module, *, stop_ids: Sequence[int], pad_id: int):
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        self.inference: PreTrainedModel | None = None
        """A plain model on the weights of the last sync."""

    def sync(self, model: nn.Module) -> None:
        """Take the model's current weights (adapters merged, as they compute now) for the samples that follow."""
        sharded = is_sharded(model)
        with full_parameters(model):
            hf = transformers_model(model)
            params, buffers, merged = merged_tensors(hf)
            if sharded:  # gathered tensors are freed when the shards come back: keep copies
                params = {name: tensor.clone() for name, tensor in params.items()}
                buffers = {name: tensor.clone() for name, tensor in buffers.items()}
            if self.inference is None:
                self.inference = inference_model(hf.config, params, buffers)
                return
            current = dict(self.inference.named_parameters(remove_duplicate=False))
            with torch.no_grad():
                # Unsharded, the other tensors are the model's own and need no copy; sharded, every one does.
                for name in params if sharded else merged:
                    current[name].copy_(params[name])

    def sample(
        self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, generator: torch.Generator | None
    ) -> Sequences:
        model = self.synced()
        query, mask = left_pad(prompts, self.pad_id, model.device)
        draw = DrawEachToken(settings, generator)
        with torch.no_grad():
            out = model.generate(
                input_ids=query,
                attention_mask=mask,
                generation_config=self.generation_config(settings),
                logits_processor=[draw],
            )
        tokens = out[:, query.shape[1] :]
        logprobs = torch.stack(draw.logprobs[: tokens.shape[1]], dim=1)
        return finish(query, mask, tokens, logprobs, self.stop_ids, self.pad_id)

    def stream(
        self, prompt: Sequence[int], settings: SamplingSettings, generator: torch.Generator | None
    ) -> Iterator[int]:
        """Tokens as `generate` produces them (it runs in a thread); closing the iterator stops it."""
        model = self.synced()
        query, mask = left_pad([prompt], self.pad_id, model.device)
        tokens = TokenQueue()
        stop = threading.Event()

        def run() -> None:
            try:
                with torch.no_grad():
                    model.generate(
                        input_ids=query,
                        attention_mask=mask,
                        generation_config=self.generation_config(settings),
                        logits_processor=[DrawEachToken(settings, generator)],
                        stopping_criteria=[StopWhenSet(stop)],
                        streamer=tokens,
                    )
            except BaseException as error:  # the consumer re-raises it in its own thread
                tokens.fail(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from tokens
        finally:
            stop.set()
            thread.join()

    def generation_config(self, settings: SamplingSettings) -> GenerationConfig:
        # A fresh config: the model's own may carry sampling defaults (repetition penalty, top-k) that
        # would change the distribution the tokens and their log-probs come from.
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )

    def synced(self) -> PreTrainedModel:
        if self.inference is None:
            raise RuntimeError("the hf engine has no weights yet: call sync(model) first")
        return self.inference


def inference_model(config, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> PreTrainedModel:
    """A plain transformers model for `config` whose tensors are `params` and `buffers` (no copy, no
    random initialisation: it is built on the meta device and handed the tensors)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name, tensor in params.items():
        owner, _, key = name.rpartition(".")
        setattr(model.get_submodule(owner), key, nn.Parameter(tensor, requires_grad=False))
    for (
        name,
        tensor,
    ) in buffers.items():  # an existing buffer's name: it stays a buffer, as persistent as it was
        owner, _, key = name.rpartition(".")
        setattr(model.get_submodule(owner), key, tensor)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


class TokenQueue(BaseStreamer):
    """A `generate` streamer that hands token ids to another thread, one at a time."""

    END = object()

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        for token in value.flatten().tolist():
            self.items.put(token)

    def end(self) -> None:
        self.items.put(self.END)

    def fail(self, error: BaseException) -> None:
        self.items.put(error)

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self.items.get()
            if item is self.END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class StopWhenSet(StoppingCriteria):
    """Ends generation once the consumer of a stream has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )
