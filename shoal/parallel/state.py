"""ParallelState: this process's place in the split — its rank, its pipeline stage, its rank inside
the stage, the process groups it talks over, and which layers and experts it holds.

Rank layout: rank = stage * stage_size + local, where stage_size = max(tp, ep). Rank 0 is the engine
process. Three groups: the default group (the device's collective backend: gloo, nccl, hccl) for
activations between stages; one group per stage (same backend) for tensor / expert collectives;
and a gloo group over CPU tensors with no practical timeout that carries the engine's step messages
to idle workers (a worker may wait for work indefinitely, a collective may not).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shoal.parallel.config import ParallelConfig
from shoal.parallel.split import ranges

_IDLE_TIMEOUT = datetime.timedelta(days=365)
MIN_JOIN_TIMEOUT_S = 120.0  # seconds every rank has to join at start, whatever the collective timeout


@dataclass
class ParallelState:
    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    stage_group: object = None
    control_group: object = None
    layer_sizes: list[int] = field(default_factory=list)
    expert_sizes: list[int] = field(default_factory=list)

    # ---- where this rank sits --------------------------------------------------------------
    @property
    def stage_size(self) -> int:
        return self.config.stage_size

    @property
    def stage(self) -> int:
        return self.rank // self.stage_size

    @property
    def local_rank(self) -> int:
        return self.rank % self.stage_size

    @property
    def tp(self) -> int:
        return self.config.tp

    @property
    def tp_rank(self) -> int:
        return self.local_rank if self.config.tp > 1 else 0

    @property
    def ep(self) -> int:
        return self.config.ep

    @property
    def ep_rank(self) -> int:
        return self.local_rank if self.config.ep > 1 else 0

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.config.pp - 1

    def stage_rank(self, stage: int, local: int | None = None) -> int:
        """The global rank of `local` (default: this rank's) in pipeline stage `stage`."""
        return stage * self.stage_size + (self.local_rank if local is None else local)

    @property
    def last_stage_leader(self) -> int:
        return self.stage_rank(self.config.pp - 1, 0)

    def layer_range(self, stage: int | None = None) -> tuple[int, int]:
        return ranges(self.layer_sizes)[self.stage if stage is None else stage]

    def expert_range(self, ep_rank: int | None = None) -> tuple[int, int]:
        return ranges(self.expert_sizes)[self.ep_rank if ep_rank is None else ep_rank]

    def describe(self) -> str:
        a, b = self.layer_range()
        return f"rank {self.rank} (stage {self.stage}, layers {a}-{b - 1}, local rank {self.local_rank})"


def init_process_groups(config: ParallelConfig, rank: int, world_size: int, dist_backend: str,
                        device: torch.device, master_addr: str, master_port: int) -> ParallelState:
    """Join the job (every rank calls this with the same config) and create the groups. `master_addr` is rank 0's
    host (a TCP rendezvous on master_port), or a file:// URL (a file store, for ranks on one host)."""
    if world_size != config.world_size:
        from shoal.errors import ConfigError

        raise ConfigError(
            f"the launch has {world_size} processes but tp x pp (x ep) asks for {config.world_size}; "
            "start one process per device of the split"
        )
    timeout = datetime.timedelta(seconds=config.collective_timeout)
    if master_addr.startswith("file://"):  # one host: a file store, no TCP listener (see MultiprocExecutor)
        init_method = master_addr
    else:
        os.environ.setdefault("MASTER_ADDR", master_addr)
        os.environ.setdefault("MASTER_PORT", str(master_port))
        init_method = f"tcp://{master_addr}:{master_port}"
    # Joining waits for every rank to start (import torch, read the config), which on a loaded host can
    # take longer than a collective may: a short --collective-timeout must not fail the start.
    join = datetime.timedelta(seconds=max(config.collective_timeout, MIN_JOIN_TIMEOUT_S))
    store, rank, world_size = next(dist.rendezvous(init_method, rank, world_size, timeout=join))
    if init_method.startswith("file://"):
        # A TCP rendezvous waits (up to `join`) for every rank to connect; a file store returns at once, and
        # init_process_group would give the slowest rank only the collective timeout to arrive.
        store.set_timeout(join)
        store.set(f"shoal/joined/{rank}", "1")
        store.wait([f"shoal/joined/{r}" for r in range(world_size)])
    dist.init_process_group(dist_backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    state = ParallelState(config, rank, world_size, device)
    size = config.stage_size
    for stage in range(config.pp):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(stage * size, (stage + 1) * size)), backend=dist_backend, timeout=timeout)
        if stage == state.stage:
            state.stage_group = group
    state.control_group = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    return state


def shutdown_process_groups() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            pass
