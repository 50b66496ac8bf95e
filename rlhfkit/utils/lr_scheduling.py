"""Learning-rate schedules (spec 3.3): a multiplier of the base learning rate at `step` of `total_steps`."""

from __future__ import annotations

import math
from typing import Literal

LRSchedule = Literal["linear", "cosine", "constant"]


def compute_schedule_lr_multiplier(lr_schedule: LRSchedule, step: int, total_steps: int) -> float:
    """linear: 1 - step/T; cosine: (1 + cos(pi*step/T))/2; constant: 1. The last step's linear lr is 1/T."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if lr_schedule == "linear":
        return 1 - step / total_steps
    if lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total_steps))
    if lr_schedule == "constant":
        return 1.0
    raise ValueError(f"unknown lr_schedule {lr_schedule!r}; use 'linear', 'cosine' or 'constant'")
