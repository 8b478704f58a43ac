"""Learning-rate schedules: linear warmup, then linear, cosine or constant decay.

A schedule is a pure function of the optimizer step, so resuming needs only the step.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, warmup: int, total: int, kind: str = "linear", floor: float = 0.0) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total``.

    Warmup rises linearly from ``peak/(warmup+1)`` so the first step already learns (as
    Hugging Face's and Unsloth's schedules do with ``(step+1)/warmup``); decay then runs
    from ``peak`` at the end of warmup to ``floor`` at ``total``.
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if kind == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))  # 0 -> 1 over the decay phase
    if kind == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    if kind == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")
