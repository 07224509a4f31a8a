"""Learning-rate schedules: linear warm-up, then linear, cosine or no decay."""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("linear", "cosine", "constant")


def warmup_schedule(
    optimizer: Optimizer,
    num_training_steps: int,
    warmup_ratio: float = 0.1,
    decay: Literal["linear", "cosine", "constant"] = "linear",
) -> LambdaLR:
    """Scale the learning rate from 0 to its peak over the first ``warmup_ratio`` of the
    steps, then decay it to 0 at ``num_training_steps`` (or hold it, with ``constant``)."""
    if decay not in DECAYS:
        raise ValueError(f"decay: {decay!r} is not one of {', '.join(DECAYS)}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio: must be in [0, 1), got {warmup_ratio}")
    warmup = round(warmup_ratio * num_training_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if decay == "constant":
            return 1.0
        progress = (step - warmup) / max(1, num_training_steps - warmup)
        if decay == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
