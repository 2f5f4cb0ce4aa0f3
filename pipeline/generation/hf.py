"""The `hf` engine: transformers' `generate` on the weights of the last sync (any causal LM, any device).

`sync(model)` makes the engine's own inference copy of the model current: a plain transformers model
without adapter layers, whose LoRA-adapted linear layers hold W + BA (merged once per sync, so no adapter
matmul runs per token), sharing every other tensor with the model. Nothing is ever merged into the
model and subtracted back (W + BA - BA rounds differently from W, and would slowly drift the frozen
reference the KL penalty is measured against). When the model is sharded (FSDP2, DeepSpeed ZeRO-3) its
parameters are gathered for the sync and the copy owns full tensors: the colocated layout TRL's GRPO
uses with vLLM, where a vLLM engine would take the same gathered weights.

Tokens are drawn by `DrawEachToken`, a logits processor running our own `pick` with the caller's
generator, one uniform number per row per step, so `hf` and the CPU engines draw the same tokens from
the same logits and a checkpointed generator resumes exactly; `generate` then takes that token greedily.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.nn.utils import skip_init
from transformers import GenerationConfig, LogitsProcessor, PreTrainedModel, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from pipeline.generation.llama import effective_weight
from pipeline.generation.sampling import SamplingSettings, Sequences, finish, left_pad, pick
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
        self.merged: list[tuple[LoraLayer, nn.Linear]] = []
        """(adapted layer of the model, plain layer of the copy holding its merged weight)."""

    def sync(self, model: nn.Module) -> None:
        """Take the model's current weights (adapters merged, as they compute now) for the samples that follow."""
        sharded = is_sharded(model)
        with torch.no_grad(), full_parameters(model):
            hf = transformers_model(model)
            if self.inference is None or sharded:
                self.inference, self.merged = inference_copy(hf, share=not sharded)
            for adapted, plain in self.merged:
                plain.weight.copy_(effective_weight(adapted)[0])

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


def inference_copy(
    hf: PreTrainedModel, *, share: bool
) -> tuple[PreTrainedModel, list[tuple[LoraLayer, nn.Linear]]]:
    """A copy of `hf` with each LoRA layer replaced by a plain linear layer (weight filled in by sync).

    `share`: the copy's other tensors are the model's own (no memory); else copies (sharded models).
    """
    memo = {id(t): t for t in (*hf.parameters(), *hf.buffers())} if share else {}
    adapted = {name: module for name, module in hf.named_modules() if isinstance(module, LoraLayer)}
    # LoRA factors are not copied: the copy's plain layer gets the merged weight at every sync.
    for layer in adapted.values():
        for tensor in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
            memo[id(tensor)] = tensor
    clone = copy.deepcopy(hf, memo)
    merged = []
    for name, layer in adapted.items():
        base = layer.get_base_layer()
        # skip_init: no random initialisation, which would draw from (and move) torch's global generator.
        plain = skip_init(
            nn.Linear,
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        plain.requires_grad_(False)
        if base.bias is not None:
            plain.bias = base.bias if share else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        clone.get_submodule(parent).register_module(child, plain)
        merged.append((layer, plain))
    clone.eval()
    return clone, merged


def is_sharded(model: nn.Module) -> bool:
    """Parameters split across processes (FSDP2, DeepSpeed ZeRO-3): they must be gathered to generate."""
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(module, FSDPModule) for module in model.modules()):
        return True
    # DeepSpeed marks the parameters it partitions with a `ds_id` (its own is_zero_param tests the same).
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside, every parameter of `model` is whole on this process (a no-op unless it is sharded)."""
    from torch.distributed.fsdp import FSDPModule

    with ExitStack() as stack:
        fsdp = [module for module in model.modules() if isinstance(module, FSDPModule)]
        for module in fsdp:
            module.unshard()
        stack.callback(lambda: [module.reshard() for module in fsdp])
        partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
        if partitioned:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(partitioned))
        yield


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
