"""The one-dimensional minimiser both fits use (`--validate` on published cases, `--calibrate` on
this machine): golden-section search, one factor at a time inside its bounds."""

from __future__ import annotations

import math
from typing import Callable


def golden_section_min(fn: Callable[[float], float], low: float, high: float, iters: int = 40) -> float:
    """The x in [low, high] that minimises fn, assuming fn has one minimum there."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = fn(d)
    return (a + b) / 2
