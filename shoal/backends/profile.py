"""What a backend reports about one device: its memory, and its measured speed (backends/measure.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryInfo:
    """Free and total bytes of one device's memory."""

    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class ThroughputProfile:
    """Measured speed of one device; feeds `shoal doctor`, the splitter and the planner."""

    memory_bandwidth_gbps: float  # GB/s (10^9 bytes per second) read + written by a large copy
    matmul_tflops: dict[str, float]  # dtype name ("bfloat16", "float32") -> TFLOP/s
    link_bandwidth_gbps: float | None = None  # device-to-device, where known
