"""The `cpu-llama` and `cpu-kernel` engines: a Llama decode step written out, for CPUs in fp32.

A transformers decode step at batch 8 spends more time dispatching its ~700 small operations than
reading the weights. LlamaDecoder writes the Llama architecture's step out (the embedded SmolLM2 and
most small chat models are Llamas): the query/key/value and gate/up projections are each one matrix
(four matmuls a layer, not seven) and the KV cache is allocated once for the whole response. It is
built from the model's weights as they are at `sync` (any active LoRA adapter merged in) and leaves
the model untouched. The two engines differ only in how each matrix is laid out and multiplied:

- `cpu-llama`: oneDNN's pre-packed products (any x86 CPU);
- `cpu-kernel`: our AVX-512 kernel (pipeline/generation/panel_linear.cpp), which streams the weights
  at the speed of a plain sum over them and runs each layer of a step in one call; built when the
  engine is made, refused where it cannot run.

An engine keeps the weight layout of its last sync and packs the next sync's weights into the same
buffers: fresh memory costs a page fault per 4 KiB, about as long as the packing itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from transformers import PreTrainedModel

from pipeline.generation.panel_linear import LowRank, PanelLinear, SpareTensors, build_kernel
from pipeline.generation.sampling import (
    SamplingSettings,
    Sequences,
    decode,
    decode_steps,
    left_pad,
    position_ids,
)
from pipeline.generation.weights import effective_weight, is_sharded
from pipeline.models import ModelError, transformers_model

Layout = Literal["onednn", "panels"]


class PackedLinear(nn.Module):
    """A read-only linear layer whose weight oneDNN has pre-packed for CPU inference (as torch.compile does).

    At the few rows of a decode step a plain fp32 matmul streams its weight at a fraction of the memory
    bandwidth; the packed layout makes the whole decode step about twice as fast on CPU.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, rows_hint: int):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=rows_hint)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def weight_and_update(linear: nn.Module) -> tuple[Tensor, LowRank | None]:
    """A linear layer's weight as it computes now, as W and a LoRA update to merge while packing.

    One plain LoRA adapter comes as its factors; any other adapter setup (several adapters, DoRA) comes
    merged by peft already.
    """
    if isinstance(linear, LoraLayer) and not linear.disable_adapters and not linear.merged:
        adapters = [name for name in linear.active_adapters if name in linear.lora_A]
        if len(adapters) == 1 and not linear.use_dora.get(adapters[0]) and not linear.fan_in_fan_out:
            name = adapters[0]
            update = LowRank(linear.lora_B[name].weight, linear.lora_A[name].weight, linear.scaling[name])
            return linear.get_base_layer().weight, update
    return effective_weight(linear)[0], None


def fused(linears: list[nn.Module], layout: Layout, rows_hint: int, spare: SpareTensors) -> nn.Module:
    """One read-only linear layer computing several side by side (their outputs concatenated)."""
    bases = [linear.get_base_layer() if isinstance(linear, LoraLayer) else linear for linear in linears]
    bias = None
    if any(base.bias is not None for base in bases):
        bias = torch.cat(
            [b.bias if b.bias is not None else b.weight.new_zeros(b.weight.shape[0]) for b in bases]
        )
    with torch.no_grad():
        if layout == "panels":
            return PanelLinear([weight_and_update(linear) for linear in linears], bias, spare)
        weights = [effective_weight(linear)[0] for linear in linears]
        return PackedLinear(torch.cat(weights) if len(weights) > 1 else weights[0], bias, rows_hint)


@dataclass
class LlamaBlock:
    input_norm: Tensor
    qkv: nn.Module
    o: nn.Module
    post_norm: Tensor
    gate_up: nn.Module
    down: nn.Module


def is_llama(model: PreTrainedModel) -> bool:
    """The architecture LlamaDecoder writes out: transformers' Llama, SiLU MLP, one tensor-parallel slice."""
    config = model.config
    return (
        config.model_type == "llama"
        and getattr(config, "hidden_act", "silu") == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
    )


class LlamaDecoder:
    """A Llama decode step from fused, pre-packed weights and a preallocated KV cache (see the module doc)."""

    def __init__(
        self, model: PreTrainedModel, layout: Layout, rows_hint: int = 8, spare: SpareTensors | None = None
    ):
        """`spare`: tensors an earlier decoder is done with (`panel_tensors`), to lay the weights out in."""
        spare = spare or SpareTensors()
        config, trunk = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.width = config.hidden_size
        self.eps = config.rms_norm_eps
        self.scale = trunk.layers[0].self_attn.scaling
        self.rotary = trunk.rotary_emb
        self.embed = trunk.embed_tokens.weight.detach()
        self.final_norm = trunk.norm.weight.detach()
        self.lm_head = fused([model.lm_head], layout, rows_hint, spare)
        self.blocks = []
        for layer in trunk.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.blocks.append(
                LlamaBlock(
                    input_norm=layer.input_layernorm.weight.detach(),
                    qkv=fused(
                        [attention.q_proj, attention.k_proj, attention.v_proj], layout, rows_hint, spare
                    ),
                    o=fused([attention.o_proj], layout, rows_hint, spare),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=fused([mlp.gate_proj, mlp.up_proj], layout, rows_hint, spare),
                    down=fused([mlp.down_proj], layout, rows_hint, spare),
                )
            )
        # A step's layers in one call each (panel_linear.cpp's decode_layer) where every product is a
        # panel kernel one without bias; else one PyTorch operation at a time (`forward`).
        self.whole_layers = self.embed.dtype == torch.float32 and all(
            isinstance(linear, PanelLinear) and linear.bias is None
            for block in self.blocks
            for linear in (block.qkv, block.o, block.gate_up, block.down)
        )

    def panel_tensors(self) -> list[Tensor]:
        linears = [self.lm_head] + [
            getattr(block, f) for block in self.blocks for f in ("qkv", "o", "gate_up", "down")
        ]
        return [linear.panels for linear in linears if isinstance(linear, PanelLinear)]

    def prefill(self, query: Tensor, mask: Tensor, new_tokens: int) -> Tensor:
        batch, width = query.shape
        shape = (batch, self.kv_heads, width + new_tokens, self.head_dim)
        self.keys = [self.embed.new_empty(shape) for _ in self.blocks]
        self.values = [self.embed.new_empty(shape) for _ in self.blocks]
        key_mask = torch.cat([mask.bool(), mask.new_zeros(batch, new_tokens, dtype=torch.bool)], dim=1)
        # Added to the attention scores of a step: 0 where a key is visible, -inf where not. Kept as floats
        # because SDPA turns a boolean mask into these anyway, once per layer.
        self.key_bias = torch.zeros(key_mask.shape, dtype=self.embed.dtype, device=query.device)
        self.key_bias.masked_fill_(~key_mask, float("-inf"))
        self.length = width
        positions = position_ids(mask)
        self.next_position = positions[:, -1:] + 1
        causal = torch.ones(width, width, dtype=torch.bool, device=query.device).tril()
        # Each padding position also sees itself: a row with no visible key would make NaNs that reach the
        # cache (masked out later, but 0 x NaN is NaN).
        visible = (causal & mask.bool()[:, None, :]) | torch.eye(width, dtype=torch.bool, device=query.device)
        return self.forward(query, positions, 0, visible.unsqueeze(1))

    def step(self, token: Tensor) -> Tensor:
        slot = self.length
        self.key_bias[:, slot] = 0
        self.length += 1
        if self.whole_layers:
            logits = self.step_whole_layers(token, slot)
        else:
            visible = self.key_bias[:, None, None, : self.length]
            logits = self.forward(token.unsqueeze(1), self.next_position, slot, visible)
        self.next_position = self.next_position + 1
        return logits

    def step_whole_layers(self, token: Tensor, slot: int) -> Tensor:
        """`forward` for one new token per row, each layer one call to decode_layer."""
        x = F.embedding(token, self.embed)  # [B, width], the residual stream, updated in place
        cos, sin = self.rotary(x, self.next_position)  # [B, 1, D]
        cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()
        for block, keys, values in zip(self.blocks, self.keys, self.values, strict=True):
            torch.ops.rlhf.decode_layer(
                x,
                block.input_norm,
                block.qkv.panels,
                block.o.panels,
                block.post_norm,
                block.gate_up.panels,
                block.down.panels,
                cos,
                sin,
                keys,
                values,
                self.key_bias,
                slot,
                self.heads,
                self.kv_heads,
                self.eps,
                self.scale,
            )
        return self.lm_head(F.rms_norm(x, (self.width,), self.final_norm, self.eps))

    def forward(self, ids: Tensor, positions: Tensor, start: int, visible: Tensor) -> Tensor:
        """Logits [B, V] after the last of `ids` [B, T], whose cache slots begin at `start`."""
        batch, length = ids.shape
        end = start + length
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, D]: broadcast over heads
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for block, keys, values in zip(self.blocks, self.keys, self.values, strict=True):
            h = F.rms_norm(x, (self.width,), block.input_norm, self.eps)
            qk, v = block.qkv(h).split([q_width + kv_width, kv_width], dim=-1)
            qk = rotate(qk.view(batch, length, self.heads + self.kv_heads, self.head_dim), cos, sin)
            q, k = qk.split([self.heads, self.kv_heads], dim=2)
            keys[:, :, start:end] = k.transpose(1, 2)
            values[:, :, start:end] = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            attended = self.attend(q, keys[:, :, :end], values[:, :, :end], visible)
            x = x + block.o(attended.reshape(batch, length, q_width))
            h = F.rms_norm(x, (self.width,), block.post_norm, self.eps)
            gate, up = block.gate_up(h).chunk(2, dim=-1)
            x = x + block.down(F.silu(gate) * up)
        return self.lm_head(F.rms_norm(x[:, -1], (self.width,), self.final_norm, self.eps))

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, visible: Tensor) -> Tensor:
        """Attention of q [B, T, heads, D] over the cache [B, kv_heads, L, D] -> [B, T, heads, D]."""
        batch, length = q.shape[:2]
        if length == 1:
            # One query per head: the query heads sharing a key/value head become that head's queries,
            # one pass over each head's cache (a quarter faster than enable_gqa here: bench/RESULTS.md).
            grouped = q.reshape(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            attended = F.scaled_dot_product_attention(
                grouped, keys, values, attn_mask=visible, scale=self.scale
            )
            return attended.reshape(batch, 1, self.heads, self.head_dim)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys,
            values,
            attn_mask=visible,
            scale=self.scale,
            enable_gqa=self.heads != self.kv_heads,
        )
        return attended.transpose(1, 2)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding on [B, T, heads, D] (transformers' rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def check_llama(model: nn.Module, engine: str) -> None:
    """Refuse a model the Llama decode step cannot run, naming the engine that can."""
    hf = transformers_model(model)
    weight = hf.get_input_embeddings().weight
    problems = []
    if is_sharded(model):
        problems.append("the whole model on this process (it is sharded: FSDP or ZeRO-3)")
    if not is_llama(hf):
        problems.append(f"a Llama-architecture model (this is {hf.config.model_type})")
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        problems.append(f"fp32 weights on the CPU (these are {weight.dtype} on {weight.device.type})")
    if problems:
        raise ModelError(
            f"the {engine} rollout engine needs {' and '.join(problems)}; use rollout_engine: hf (or auto)"
        )


class LlamaEngine:
    """Sampling through LlamaDecoder: `cpu-llama` (oneDNN products) or `cpu-kernel` (our AVX-512 kernel)."""

    def __init__(
        self, model: nn.Module, *, layout: Layout, stop_ids: Sequence[int], pad_id: int, rows_hint: int = 8
    ):
        self.name = "cpu-kernel" if layout == "panels" else "cpu-llama"
        check_llama(model, self.name)
        self.build_seconds = build_kernel() if layout == "panels" else 0.0
        self.layout, self.rows_hint = layout, rows_hint
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        self.device = transformers_model(model).get_input_embeddings().weight.device
        self.decoder: LlamaDecoder | None = None

    def sync(self, model: nn.Module) -> None:
        """Lay out the model's current weights (adapters merged) for the samples that follow."""
        spare = SpareTensors(self.decoder.panel_tensors() if self.decoder is not None else None)
        self.decoder = None  # its panels are the spare ones now
        with torch.no_grad():
            self.decoder = LlamaDecoder(transformers_model(model), self.layout, self.rows_hint, spare)

    def sample(
        self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, generator: torch.Generator | None
    ) -> Sequences:
        query, mask = left_pad(prompts, self.pad_id, self.device)
        with torch.no_grad():
            return decode(
                self.synced(),
                query,
                mask,
                settings,
                stop_ids=self.stop_ids,
                pad_id=self.pad_id,
                generator=generator,
            )

    def stream(
        self, prompt: Sequence[int], settings: SamplingSettings, generator: torch.Generator | None
    ) -> Iterator[int]:
        query, mask = left_pad([prompt], self.pad_id, self.device)
        with torch.no_grad():
            steps = decode_steps(
                self.synced(),
                query,
                mask,
                settings,
                stop_ids=self.stop_ids,
                pad_id=self.pad_id,
                generator=generator,
            )
            for token, _ in steps:
                yield int(token[0])

    def synced(self) -> LlamaDecoder:
        if self.decoder is None:
            raise RuntimeError(f"the {self.name} engine has no weights yet: call sync(model) first")
        return self.decoder
