"""Driver: rank 0's handle on a split model — starts the workers (executor.py), builds rank 0's own
shard, hands the engine its KV cache and runner, and stops everything at the end."""

from __future__ import annotations

import atexit
import logging

from shoal.parallel.executor import RankSetup, kv_pool, make_executor, setup_rank
from shoal.parallel.runtime import ParallelRunner, local_cache
from shoal.parallel.state import ParallelState, shutdown_process_groups

log = logging.getLogger("shoal.parallel")


def check_split(engine_config):
    """Fail before any process starts when the split cannot fit the model (same checks every rank runs);
    return what was read (shoal.parallel.build.ModelSource), for rank 0 to build its shard from."""
    from shoal.backends import parse_device
    from shoal.loader import resolve_model_path
    from shoal.parallel.build import ModelSource, plan_splits

    parallel = engine_config.parallel
    state = ParallelState(parallel, 0, parallel.world_size, None)
    source = ModelSource.open(resolve_model_path(engine_config.model_path), parse_device(engine_config.device)[0],
                              engine_config.quant, engine_config.quant_group_size)
    plan_splits(source.config, state, None, source.quant)
    return source


class Driver:
    def __init__(self, engine_config) -> None:
        source = check_split(engine_config)
        self.engine_config = engine_config
        self.executor = make_executor(engine_config)
        self.runner: ParallelRunner | None = None
        rank, world, local_rank, addr, port = self.executor.start(engine_config)
        try:
            self.setup: RankSetup = setup_rank(engine_config, rank, world, local_rank, addr, port, source)
        except BaseException:
            self.shutdown()
            raise
        atexit.register(self.shutdown)

    @property
    def failure(self):
        return self.executor.failure

    def kv_pool(self, max_len: int):
        """Rank 0's KV pool (every rank sizes its own by the same rule)."""
        return kv_pool(self.engine_config, self.setup, max_len)

    def make_runner(self, kv_bytes: int, block_size: int, kv_quant: str | None):
        s = self.setup
        cache = local_cache(s.model, s.state, kv_bytes, block_size, s.dtype, s.device, kv_quant)
        self.runner = ParallelRunner(s.model, cache, s.device, s.state, self.executor.failure)
        return cache, self.runner

    def shutdown(self) -> None:
        """Tell the workers to stop, wait for them, leave the process groups. Idempotent."""
        if self.executor.stopping:
            return
        self.executor.stopping = True
        if self.runner is not None:
            self.runner.stop()
        self.executor.stop()
        shutdown_process_groups()
