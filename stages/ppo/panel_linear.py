"""The decode step's matrix products on CPUs with AVX-512: our own kernel, panel_linear.cpp.

A decode step at batch 8 reads every weight once for 8 multiply-adds, so it runs at the speed weights
stream from memory; the kernel streams them about a third faster than oneDNN's pre-packed products
(bench/RESULTS.md). torch builds it on first use with the machine's C++ compiler and keeps the build
(~/.cache/torch_extensions), so only the first rollout on a machine waits for it (about 40 s). Where
there is no AVX-512 or no compiler, `panel_kernel()` is False and decoding uses oneDNN as before.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
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


class PanelLinear(nn.Module):
    """A read-only fp32 linear layer through panel_linear (needs `panel_kernel()`).

    `weights` are stacked along the outputs, as if concatenated (q, k and v: one product); each is
    written straight into the panels when its row count allows, without a concatenated copy first.
    """

    def __init__(self, weights: list[Tensor], bias: Tensor | None):
        super().__init__()
        self.out_features = sum(w.shape[0] for w in weights)
        if any(w.shape[0] % PANEL for w in weights):  # pad once, at the end
            whole = torch.cat(weights)
            weights = [F.pad(whole, (0, 0, 0, -whole.shape[0] % PANEL))]
        panel_count = sum(w.shape[0] for w in weights) // PANEL
        self.panels = weights[0].new_empty(panel_count, weights[0].shape[1], PANEL)
        first = 0
        for weight in weights:
            torch.ops.rlhf.pack_panels(weight.detach(), self.panels, first)
            first += weight.shape[0] // PANEL
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.rlhf.panel_linear(x, self.panels)
        if y.shape[-1] != self.out_features:
            y = y[..., : self.out_features]
        return y if self.bias is None else y + self.bias
