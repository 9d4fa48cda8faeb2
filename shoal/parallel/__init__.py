"""Many devices as one: process groups, tensor / expert / pipeline splits, and launching workers.

The engine process (rank 0) schedules and also runs the first shard; one worker process per other
device runs its shard of every step. See DESIGN.md ("parallel") and README ("Many chips as one").
"""

from shoal.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
