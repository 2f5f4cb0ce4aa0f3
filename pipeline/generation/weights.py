"""A model's weights as they compute now, whole: LoRA adapters merged, sharded parameters gathered.

Engines take the policy's weights after every update. Under DDP (or on one device) every process holds
them whole; under FSDP2 or DeepSpeed ZeRO-3 each holds a shard, and `full_parameters` gathers them for
the time an engine copies them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn


def effective_weight(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of a linear layer as it computes now: W + BA while a LoRA adapter is active."""
    if not isinstance(linear, LoraLayer):
        return linear.weight, linear.bias
    base = linear.get_base_layer()
    weight = base.weight
    if not linear.disable_adapters and not linear.merged:
        adapters = [name for name in linear.active_adapters if name in linear.lora_A]
        for name in adapters:
            weight = weight + linear.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


def merged_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor], set[str]]:
    """(parameters, buffers, merged) of a transformers model with LoRA layers injected, by the names the
    same model without adapters has: each adapted layer's weight is W + BA (`merged` names those), every
    other tensor is the model's own."""
    params: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    merged: set[str] = set()
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in model.named_modules():
        if any(name.startswith(f"{layer}.") for layer in adapted):
            continue  # the adapter's own modules: folded into the merged weight
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            weight, bias = effective_weight(module)
            params[f"{prefix}weight"] = weight.detach()
            merged.add(f"{prefix}weight")
            if bias is not None:
                params[f"{prefix}bias"] = bias.detach()
            continue
        params |= {prefix + key: p.detach() for key, p in module.named_parameters(recurse=False)}
        buffers |= {prefix + key: b for key, b in module.named_buffers(recurse=False)}
    return params, buffers, merged


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

    with ExitStack() as stack, torch.no_grad():
        fsdp = [module for module in model.modules() if isinstance(module, FSDPModule)]
        for module in fsdp:
            module.unshard()
        stack.callback(lambda: [module.reshard() for module in fsdp])
        partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
        if partitioned:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(partitioned))
        yield
