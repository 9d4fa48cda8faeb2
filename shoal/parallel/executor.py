"""Launching the ranks of a split model. Three ways, one worker code path (`worker_main`):

  mp        one host: this process is rank 0 and spawns one worker process per other device
            (torch.multiprocessing, spawn), watching each so a death is reported with its rank;
  torchrun  many hosts: every process is started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
            MASTER_ADDR, MASTER_PORT in the environment); rank 0 serves, the others become workers;
  ray       an existing Ray cluster: rank 0 here, workers as Ray actors (ray is optional; without
            it this says how to install it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shoal.errors import ConfigError
from shoal.parallel.runtime import WorkerFailure, local_cache, worker_loop
from shoal.parallel.state import ParallelState, init_process_groups, shutdown_process_groups

log = logging.getLogger("shoal.parallel")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_env() -> tuple[int, int, int, str, int] | None:
    """(rank, world size, local rank, master addr, master port) when started by torchrun (or alike)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers") from None


@dataclass
class RankSetup:
    """What setup_rank builds on every rank."""

    state: ParallelState
    model: object
    model_config: object
    dtype: torch.dtype
    backend: object
    device: torch.device
    path: object
    gguf_file: object = None  # the opened GGUF file (shoal.gguf.GGUFFile), whose metadata holds the tokenizer


def _engine_spec(engine_config) -> dict:
    fields = {k: getattr(engine_config, k) for k in engine_config.__dataclass_fields__}
    if isinstance(fields.get("dtype"), torch.dtype):
        fields["dtype"] = str(fields["dtype"]).removeprefix("torch.")
    for key in ("pp_layers", "ep_weights"):
        if isinstance(fields.get(key), list):
            fields[key] = ",".join(str(v) for v in fields[key])
    return fields


def setup_rank(engine_config, rank: int, world_size: int, local_rank: int, master_addr: str,
               master_port: int, source=None) -> RankSetup:
    """Join the job, agree on the split, and build this rank's shard of the model (from `source`, a
    ModelSource already read, or from the model path)."""
    from shoal.backends import parse_device
    from shoal.loader import resolve_model_path
    from shoal.parallel.build import ModelSource, build_model_shard, plan_splits

    parallel = engine_config.parallel
    backend, index = parse_device(engine_config.device)
    if backend.device_type != "cpu":
        index = (index or 0) + local_rank if world_size > 1 else index
        index %= max(1, backend.device_count())
    backend.set_device(index)
    backend.set_isa_level(engine_config.cpu_isa)
    device = backend.torch_device(index)
    state = init_process_groups(parallel, rank, world_size, backend.dist_backend, device, master_addr, master_port)
    speeds = None
    if parallel.pp_layers == "auto" or parallel.ep_weights == "auto":
        # Decode reads every weight once per step: memory bandwidth is the speed that matters.
        mine = torch.tensor([backend.measure_throughput(index, quick=True).memory_bandwidth_gbps], dtype=torch.float64)
        every = [torch.zeros(1, dtype=torch.float64) for _ in range(world_size)]
        dist.all_gather(every, mine, group=state.control_group)
        size = parallel.stage_size
        speeds_by_rank = [float(t) for t in every]
        if parallel.pp_layers == "auto":  # a stage is as fast as its slowest rank
            speeds = [min(speeds_by_rank[s * size:(s + 1) * size]) for s in range(parallel.pp)]
        if parallel.ep_weights == "auto":
            speeds = speeds_by_rank[:size]
        log.info("measured memory bandwidth per rank (GB/s): %s", speeds_by_rank)
    path = resolve_model_path(engine_config.model_path)
    if source is None:
        source = ModelSource.open(path, backend, engine_config.quant, engine_config.quant_group_size)
    plan_splits(source.config, state, speeds, source.quant)
    progress = engine_config.progress and rank == 0
    model, model_config, dtype = build_model_shard(source, backend, device, engine_config.torch_dtype, state, progress,
                                                   engine_config.cpu_kernels)
    log.info("%s ready: experts %s", state.describe(), state.expert_range() if parallel.ep > 1 else "all")
    return RankSetup(state, model, model_config, dtype, backend, device, path,
                     source.gguf.file if source.gguf is not None else None)


def kv_pool(engine_config, setup: RankSetup, max_len: int):
    """This rank's KV pool (shoal.engine.kv_pool.KVPool): --kv-cache-memory if given, else the default rule
    over its share of the layers."""
    from shoal.engine.kv_pool import KVPool, default_kv_pool
    from shoal.layers.paged_kv_cache import PagedKVCache

    if engine_config.kv_cache_memory:
        return KVPool(engine_config.kv_cache_memory, "--kv-cache-memory")
    first, end = setup.state.layer_range()
    per_token = PagedKVCache.bytes_per_block(end - first, 1, setup.model.cache_entry_shapes(), setup.dtype,
                                             engine_config.kv_quant)
    free = setup.backend.memory_info(setup.device.index or 0).free_bytes
    return default_kv_pool(per_token, max_len, engine_config.max_num_seqs, free, setup.device.type == "cpu")


def kv_cache_bytes(engine_config, setup: RankSetup, max_len: int) -> int:
    return kv_pool(engine_config, setup, max_len).bytes


def max_model_len(engine_config, model_config) -> int:
    max_len = model_config.max_position_embeddings
    return min(max_len, engine_config.max_model_len) if engine_config.max_model_len else max_len


def worker_main(spec_json: str, rank: int, world_size: int, local_rank: int, master_addr: str,
                master_port: int) -> None:
    """A worker's whole life: join, build its shard and its cache, run steps until stopped."""
    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import DEFAULT_BLOCK_SIZE

    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec.pop("_threads", torch.get_num_threads())))
    logging.basicConfig(level=logging.WARNING, format=f"shoal worker rank {rank}: %(message)s")
    try:
        engine_config = EngineConfig(**spec)
        setup = setup_rank(engine_config, rank, world_size, local_rank, master_addr, master_port)
        max_len = max_model_len(engine_config, setup.model_config)
        cache = local_cache(setup.model, setup.state, kv_cache_bytes(engine_config, setup, max_len),
                            DEFAULT_BLOCK_SIZE, setup.dtype, setup.device, engine_config.kv_quant)
        worker_loop(setup.model, cache, setup.state)
    except Exception as exc:  # the engine names this rank from our exit; say why here
        print(f"shoal worker rank {rank}: stopping: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        shutdown_process_groups()
        os._exit(1)
    shutdown_process_groups()


def _spawn_target(spec_json, rank, world_size, master_addr, master_port) -> None:
    worker_main(spec_json, rank, world_size, rank, master_addr, master_port)


class Executor:
    """Rank 0's handle on its workers: start them, report the first one that stops, stop them."""

    def __init__(self) -> None:
        self.failure = WorkerFailure()
        self.stopping = False
        self._rendezvous_dir: str | None = None

    def start(self, engine_config) -> tuple[int, int, int, str, int]:
        raise NotImplementedError

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True

    def _file_store(self) -> tuple[str, int]:
        """(master addr, port) of a rendezvous through a file, for ranks that all run on this host: never a
        TCP store, which torch opens on every interface, unauthenticated, whatever address it is given."""
        self._rendezvous_dir = tempfile.mkdtemp(prefix="shoal-rendezvous-")
        return f"file://{os.path.join(self._rendezvous_dir, 'store')}", 0

    def _remove_file_store(self) -> None:
        if self._rendezvous_dir:
            shutil.rmtree(self._rendezvous_dir, ignore_errors=True)


class MultiprocExecutor(Executor):
    def start(self, engine_config):
        import torch.multiprocessing as mp

        parallel = engine_config.parallel
        world = parallel.world_size
        addr, port = parallel.master_addr, parallel.master_port
        if port is None:  # every rank is on this host
            addr, port = self._file_store()
        spec = json.dumps({**_engine_spec(engine_config), "_threads": torch.get_num_threads()})
        context = mp.get_context("spawn")
        self.processes = []
        for rank in range(1, world):
            process = context.Process(target=_spawn_target, args=(spec, rank, world, addr, port), daemon=True,
                                      name=f"shoal-worker-{rank}")
            process.start()
            self.processes.append((rank, process))
        threading.Thread(target=self._watch, name="shoal-worker-watch", daemon=True).start()
        return 0, world, 0, addr, port

    def _watch(self) -> None:
        from multiprocessing.connection import wait

        alive = {p.sentinel: (rank, p) for rank, p in self.processes}
        while alive:
            for sentinel in wait(list(alive)):
                rank, process = alive.pop(sentinel)
                process.join(5)
                if self.stopping:
                    continue
                code = process.exitcode
                how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
                if self.failure.reason is None:
                    self.failure.reason = f"worker rank {rank} (pid {process.pid}) {how}; the model cannot run without it"
                    log.error("%s", self.failure.reason)

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        for _, process in self.processes:
            process.join(timeout)
        for _, process in self.processes:
            if process.is_alive():
                process.terminate()
        self._remove_file_store()


class TorchrunExecutor(Executor):
    """Workers are started by torchrun on every host; rank 0 only learns of a failure from a collective."""

    def start(self, engine_config):
        env = torchrun_env()
        if env is None:
            raise ConfigError("--distributed-executor torchrun needs the variables torchrun sets (RANK, WORLD_SIZE, "
                              "MASTER_ADDR, MASTER_PORT); start the command under torchrun")
        return env


class RayExecutor(Executor):
    """Workers as Ray actors on an existing cluster (`ray start --head` on one host, `ray start
    --address=HEAD:6379` on the others); rank 0 runs here."""

    def start(self, engine_config):
        try:
            import ray
        except ImportError:
            raise ConfigError("--distributed-executor ray needs Ray: pip install 'ray>=2.52' (shoal's extra: "
                              "'.[ray]'), then start a cluster (ray start --head) and run this command on one of "
                              "its hosts") from None
        parallel = engine_config.parallel
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), ignore_reinit_error=True)
        if len([node for node in ray.nodes() if node.get("Alive")]) == 1:  # every actor runs on this host
            addr, port = self._file_store()
        else:
            addr = ray.util.get_node_ip_address()
            port = parallel.master_port or free_port("0.0.0.0")
            log.warning("the ranks meet through torch's TCP store on %s:%d, which listens on every interface "
                        "without authentication: keep that port reachable only by the cluster's hosts", addr, port)
        spec = json.dumps({**_engine_spec(engine_config), "_threads": torch.get_num_threads()})
        accelerator = 0 if (engine_config.device or "cpu").startswith("cpu") else 1
        remote = ray.remote(num_gpus=accelerator)(_RayWorker)
        world = parallel.world_size
        self.ray = ray
        self.actors = [remote.remote() for _ in range(1, world)]
        # On its own host each actor sees one device, so its local rank is 0.
        self.runs = {a.run.remote(spec, rank, world, 0, addr, port): rank for rank, a in enumerate(self.actors, 1)}
        threading.Thread(target=self._watch, name="shoal-ray-watch", daemon=True).start()
        return 0, world, 0, addr, port

    def _watch(self) -> None:
        pending = list(self.runs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            if self.stopping:
                continue
            rank = self.runs[done[0]]
            try:
                self.ray.get(done[0])
                why = "stopped"
            except Exception as exc:  # the actor died or raised
                why = f"failed: {exc}"
            if self.failure.reason is None:
                self.failure.reason = f"worker rank {rank} (Ray actor) {why}; the model cannot run without it"

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        for actor in getattr(self, "actors", []):
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        self._remove_file_store()


class _RayWorker:
    def run(self, spec_json, rank, world_size, local_rank, master_addr, master_port) -> None:
        worker_main(spec_json, rank, world_size, local_rank, master_addr, master_port)


def make_executor(engine_config) -> Executor:
    kind = engine_config.parallel.executor
    if kind == "mp" and torchrun_env() is not None and int(os.environ["WORLD_SIZE"]) > 1:
        kind = "torchrun"  # started under torchrun: the ranks exist already
    return {"mp": MultiprocExecutor, "torchrun": TorchrunExecutor, "ray": RayExecutor}[kind]()


def run_worker_if_not_rank0(engine_config) -> bool:
    """Under torchrun, a process with RANK > 0 becomes a worker here and returns True once stopped."""
    env = torchrun_env()
    if env is None or env[0] == 0 or not engine_config.parallel.enabled:
        return False
    rank, world, local_rank, addr, port = env
    spec = json.dumps(_engine_spec(engine_config))
    worker_main(spec, rank, world, local_rank, addr, port)
    return True
