"""The decode step on CPUs with AVX-512: our own kernels, panel_linear.cpp.

A decode step at batch 8 reads every weight once for 8 multiply-adds, so it runs at the speed weights
stream from memory; panel_linear streams them at the speed of a plain sum, about 1.7x oneDNN's
pre-packed products (bench/decode_matmul.py). pack_panels lays a weight out for it, merging a LoRA
update on the way; decode_layer runs the rest of a Llama layer's step around its four products.
torch builds them on first use with the machine's C++ compiler and keeps the build
(~/.cache/torch_extensions), so only the first rollout on a machine waits for it (about 40 s). Where
there is no AVX-512 or no compiler, `panel_kernel()` is False and decoding uses oneDNN as before.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOURCE = Path(__file__).with_name("panel_linear.cpp")
PANEL = 16  # output columns per panel, one AVX-512 register of floats


@functools.cache
def panel_kernel() -> bool:
    """Whether torch.ops.rlhf.panel_linear can run here (building it on first call)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # torch builds with ninja; pip installs it next to this interpreter
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        load(
            name="rlhf_panel_linear",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx512f", "-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure means the oneDNN path instead
        warnings.warn(f"panel_linear kernel not built ({error}); decoding with oneDNN instead", stacklevel=2)
        return False
    return True


@dataclass
class LowRank:
    """A LoRA adapter's update to a weight: scale * B @ A, B [out, r], A [r, in]."""

    b: Tensor
    a: Tensor
    scale: float

    def merged_into(self, weight: Tensor) -> Tensor:
        return torch.addmm(weight, self.b, self.a, alpha=self.scale)


class SpareTensors:
    """Tensors a previous decoder of the same model is done with, to pack into again.

    Fresh memory costs a page fault per 4 KiB on first write: for the embedded model's 538 MB of panels
    that was about as long as the packing itself, every rollout.
    """

    def __init__(self, tensors: list[Tensor] | None = None):
        self.by_shape: dict[tuple[int, ...], list[Tensor]] = {}
        for tensor in tensors or []:
            self.by_shape.setdefault(tuple(tensor.shape), []).append(tensor)

    def unused(self) -> list[Tensor]:
        return [tensor for tensors in self.by_shape.values() for tensor in tensors]

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        spare = self.by_shape.get(shape)
        if spare and spare[-1].dtype == like.dtype and spare[-1].device == like.device:
            return spare.pop()
        return like.new_empty(shape)


class PanelLinear(nn.Module):
    """A read-only fp32 linear layer through panel_linear (needs `panel_kernel()`).

    `parts` are (weight, LoRA update or None), stacked along the outputs as if concatenated (q, k and v:
    one product). Each is written straight into the panels, its update merged on the way, when its row
    count allows: no merged or concatenated copy of the weights is made.
    """

    def __init__(
        self,
        parts: list[tuple[Tensor, LowRank | None]],
        bias: Tensor | None,
        spare: SpareTensors | None = None,
    ):
        super().__init__()
        self.out_features = sum(w.shape[0] for w, _ in parts)
        if any(w.shape[0] % PANEL for w, _ in parts):  # merge, concatenate and pad once, at the end
            whole = torch.cat([w if update is None else update.merged_into(w) for w, update in parts])
            parts = [(F.pad(whole, (0, 0, 0, -whole.shape[0] % PANEL)), None)]
        panel_count = sum(w.shape[0] for w, _ in parts) // PANEL
        self.panels = (spare or SpareTensors()).take((panel_count, parts[0][0].shape[1], PANEL), parts[0][0])
        first = 0
        for weight, update in parts:
            factors = (None, None, 1.0) if update is None else (update.b, update.a, update.scale)
            torch.ops.rlhf.pack_panels(weight.detach(), self.panels, first, *factors)
            first += weight.shape[0] // PANEL
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.rlhf.panel_linear(x, self.panels)
        if y.shape[-1] != self.out_features:
            y = y[..., : self.out_features]
        return y if self.bias is None else y + self.bias
