"""The decode step on CPUs with AVX-512: our own kernels, panel_linear.cpp (the `cpu-kernel` engine).

A decode step at batch 8 reads every weight once for 8 multiply-adds, so it runs at the speed weights
stream from memory; panel_linear streams them at the speed of a plain sum, about 1.7x oneDNN's
pre-packed products (bench/decode_matmul.py). pack_panels lays a weight out for it, merging a LoRA
update on the way; decode_layer runs the rest of a Llama layer's step around its four products.
`build_kernel()` compiles them with the machine's C++ compiler through torch (about 40 s the first time,
then cached: see `build_directory`); `make install` runs it once, and the engine calls it when it is
created, at the start of a stage, so no rollout ever waits for a build, and a machine that cannot build
it is told so before any work is done. `main()` builds it alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models import ModelError

SOURCE = Path(__file__).with_name("panel_linear.cpp")
PANEL = 16  # output columns per panel, one AVX-512 register of floats
CFLAGS = ["-O3", "-mavx512f", "-fopenmp"]


class KernelUnavailable(ModelError):
    """The panel kernel cannot run on this machine; the message says why and what to use instead."""


def kernel_missing_reason() -> str | None:
    """Why the panel kernel cannot be built here (no AVX-512, no compiler), or None when it can."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return f"it needs a CPU with AVX-512 and this one offers {capability}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"it needs a C++ compiler and `{compiler}` is not on PATH (apt-get install g++)"
    return None


@contextmanager
def ninja_on_path() -> Iterator[None]:
    """torch builds with the `ninja` program, which pip installs beside this interpreter: a virtualenv
    used without activating it does not have that folder on PATH. Add it for the build only."""
    before = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{before}"
    try:
        yield
    finally:
        os.environ["PATH"] = before


def build_directory() -> Path:
    """Where this interpreter's build of the kernel is cached: one folder per source, flags, torch and
    environment. torch keys its cache by the extension's name alone, so two virtualenvs (a second clone,
    CI's) would rebuild over each other's build every time the other one ran; ninja rebuilds whenever the
    include paths in its command line change."""
    key = "\n".join([SOURCE.read_text(), *CFLAGS, torch.__version__, sys.prefix])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"rlhf_panel_linear-{digest}"


def build_kernel() -> float:
    """Compile (or load the cached build of) the kernels into torch.ops.rlhf; returns the seconds it took.

    Raises KernelUnavailable naming the reason when this machine cannot run them.
    """
    reason = kernel_missing_reason()
    if reason is not None:
        raise KernelUnavailable(f"the cpu-kernel rollout engine cannot run here: {reason}")
    from torch.utils.cpp_extension import load

    started = time.perf_counter()
    try:
        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        with ninja_on_path():
            load(
                name="rlhf_panel_linear",
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                build_directory=str(folder),
                is_python_module=False,
            )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        raise KernelUnavailable(
            f"building the cpu-kernel rollout engine ({SOURCE.name}) failed: {error}; "
            "use rollout_engine: cpu-llama (same decoder, oneDNN products) or hf"
        ) from None
    return time.perf_counter() - started


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
    """A read-only fp32 linear layer through panel_linear (needs `build_kernel()` first).

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


def main() -> int:
    """Build the kernel now (`make install` does), so the first stage that samples does not wait for it."""
    try:
        seconds = build_kernel()
    except KernelUnavailable as error:
        print(error, file=sys.stderr)
        return 1
    print(f"cpu-kernel rollout engine: kernel ready in {seconds:.1f} s, cached in {build_directory()}")
    return 0
