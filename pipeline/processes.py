"""Which of the processes `accelerate launch` started this one is (the only one, when nothing launched it).

accelerate's PartialState() reads the launch from the environment, except ACCELERATE_USE_CPU: Accelerator reads
that one itself. Under a CPU launch (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...`) a PartialState
made before any Accelerator would think itself alone, and every process would act as the main one.
"""

from __future__ import annotations

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def process_state() -> PartialState:
    """The launch's shared state: process index and count, barriers, main-process-first blocks."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
