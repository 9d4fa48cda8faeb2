"""The engine's side and the workers' side of a split model.

Rank 0 (the engine process) schedules. For every step it sends each worker one step message — two
int64 tensors over the gloo control group: a fixed header and the step's packed layout (token ids,
positions, KV slots, rows to sample) — then runs its own shard. Workers loop: receive a message, run
their shard (pipeline.run_stage), and the last stage's first rank sends the sampled rows' logits back
to rank 0, which samples. Nothing is pickled; every message is a tensor.

With pipeline stages, `launch` returns as soon as rank 0's stage has handed its activations on, so
the engine can launch the next micro-batch (other sequences) while later stages work on this one;
`collect` receives the logits of the oldest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shoal.engine.grammar import token_mask
from shoal.engine.runner import ModelRunner, chunk_rows
from shoal.engine.scheduler import ScheduledChunk
from shoal.errors import EngineUnavailableError
from shoal.layers.paged_kv_cache import PagedBatch, PagedKVCache
from shoal.layers.sampler import sample_batch
from shoal.models.base import CausalLM
from shoal.parallel.pipeline import TAG_LOGITS, StageSender, run_stage
from shoal.parallel.state import ParallelState

log = logging.getLogger("shoal.parallel")

CMD_STEP, CMD_STATS, CMD_STOP = 1, 2, 3
_HEADER = 8


# ---- step messages ------------------------------------------------------------------------------
def encode_step(batch: PagedBatch, token_ids: list[int], positions: list[int], last: list[int]) -> tuple:
    seqs, keys = batch.context_slots.shape
    longest = 0 if batch.unpack_index is None else batch.unpack_index.shape[1]
    header = torch.tensor([CMD_STEP, len(token_ids), seqs, keys, longest, len(last), 0, 0], dtype=torch.long)
    parts = [torch.tensor(token_ids), torch.tensor(positions), batch.slot_mapping.cpu(),
             batch.context_slots.flatten().cpu(), batch.context_lens.cpu()]
    if longest:
        parts += [batch.unpack_index.flatten().cpu(), batch.pack_index.cpu()]
    parts.append(torch.tensor(last, dtype=torch.long))
    return header, torch.cat([p.to(torch.long) for p in parts])


def decode_step(header: torch.Tensor, payload: torch.Tensor, device) -> tuple:
    _, tokens, seqs, keys, longest, n_last = header[:6].tolist()
    sizes = [tokens, tokens, tokens, seqs * keys, seqs] + ([seqs * longest, tokens] if longest else []) + [n_last]
    parts = [p.to(device) for p in torch.split(payload, sizes)]
    batch = PagedBatch(parts[2], parts[3].view(seqs, keys), parts[4],
                       parts[5].view(seqs, longest) if longest else None, parts[6] if longest else None)
    return parts[0][None], parts[1][None], batch, parts[-1]


def payload_size(header: torch.Tensor) -> int:
    _, tokens, seqs, keys, longest, n_last = header[:6].tolist()
    return 3 * tokens + seqs * keys + seqs + (seqs * longest + tokens if longest else 0) + n_last


# ---- expert load ------------------------------------------------------------------------------------
def expert_load_table(model: CausalLM, state: ParallelState | None) -> torch.Tensor:
    """[layers, experts] tokens routed so far by the MoE layers this rank reports (a stage's first rank)."""
    config = model.config
    experts = config.moe.num_experts if config.moe is not None else 0
    table = torch.zeros(config.num_hidden_layers, max(experts, 1), dtype=torch.long)
    if state is not None and state.local_rank != 0:
        return table
    for index, layer in enumerate(model.model.layers):
        load = getattr(getattr(layer, "mlp", None), "expert_load", None)
        if load is not None:
            table[index] = load.cpu()
    return table


def table_to_dict(table: torch.Tensor) -> dict[int, list[int]]:
    return {i: row.tolist() for i, row in enumerate(table) if int(row.sum())}


# ---- shared step logic ----------------------------------------------------------------------------
def local_cache(model: CausalLM, state: ParallelState, kv_cache_bytes: int, block_size: int, dtype, device,
                kv_quant: str | None) -> PagedKVCache:
    """This rank's KV cache: its stage's layers only (and, under tp, its share of the KV heads); the
    block count is agreed by all ranks (the smallest any can hold) so block tables mean the same."""
    shapes = model.cache_entry_shapes()
    layers = model.config.num_hidden_layers
    first, end = state.layer_range()
    per_block = PagedKVCache.bytes_per_block(end - first, block_size, shapes, dtype, kv_quant)
    count = torch.tensor([max(1, kv_cache_bytes // per_block)], dtype=torch.long)
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=state.control_group)
    cache = PagedKVCache(end - first, int(count), block_size, shapes, dtype, device, kv_quant, model.ops)
    # Layers of other stages hold nothing; the model indexes the cache by its global layer index.
    before, after = [[] for _ in range(first)], [[] for _ in range(layers - end)]
    cache.layers = before + cache.layers + after
    if kv_quant:
        cache.scales = before + cache.scales + after
    return cache


class WorkerFailure:
    """Filled by the executor: why a worker stopped (names the rank), or None while all run."""

    def __init__(self) -> None:
        self.reason: str | None = None


@dataclass
class _Launched:
    chunks: list[ScheduledChunk]
    done: list[int]
    logits: torch.Tensor | None  # already computed when rank 0 holds the last stage


class ParallelRunner(ModelRunner):
    """ModelRunner for rank 0 of a split model: same `step`, plus `launch` / `collect` for pipelining."""

    def __init__(self, model: CausalLM, cache: PagedKVCache, device: torch.device, state: ParallelState,
                 failure: WorkerFailure) -> None:
        super().__init__(model, cache, device)
        self.state, self.failure = state, failure
        self.depth = state.config.pp  # micro-batches in flight
        self.sender = StageSender()
        self.control = StageSender()
        self._stats_at, self._stats = 0.0, torch.zeros(0)
        self.stopped = False

    # ---- messages to workers ----
    def _broadcast(self, header: torch.Tensor, payload: torch.Tensor | None) -> None:
        self.control.flush()
        for rank in range(1, self.state.world_size):
            self.control.pending.append((dist.isend(header, rank, group=self.state.control_group), header))
            if payload is not None:
                self.control.pending.append((dist.isend(payload, rank, group=self.state.control_group), payload))

    def _fail(self, exc: BaseException):
        deadline = time.monotonic() + 2.0  # give the process monitor a moment to name the dead rank
        while self.failure.reason is None and time.monotonic() < deadline:
            time.sleep(0.05)
        reason = self.failure.reason or f"a worker stopped answering (collective failed: {exc})"
        self.failure.reason = reason
        return EngineUnavailableError(reason)

    # ---- steps ----
    def launch(self, chunks: list[ScheduledChunk]) -> _Launched:
        if self.failure.reason is not None:
            raise EngineUnavailableError(self.failure.reason)
        batch, token_ids, positions, offsets = self.layout(chunk_rows(chunks))
        done = [row for row, c in enumerate(chunks) if c.completes]
        last = [offsets[row] + chunks[row].num_tokens - 1 for row in done]
        try:
            self._broadcast(*encode_step(batch, token_ids, positions, last))
            self.cache.set_batch(batch)
            with torch.inference_mode():
                logits = run_stage(self.model, self.state, self.cache, self.tensor([token_ids]),
                                   self.tensor([positions]), self.tensor(last), self.sender)
        except (RuntimeError, dist.DistError) as exc:
            raise self._fail(exc) from exc
        return _Launched(chunks, done, logits)

    def collect(self, launched: _Launched) -> list:
        chunks, done = launched.chunks, launched.done
        if not done:
            return [None] * len(chunks)
        logits = launched.logits
        if logits is None:
            logits = torch.empty(len(done), self.model.config.vocab_size, dtype=torch.float32, device=self.device)
            try:
                dist.recv(logits, self.state.last_stage_leader, tag=TAG_LOGITS)
            except (RuntimeError, dist.DistError) as exc:
                raise self._fail(exc) from exc
        seqs = [chunks[row].seq for row in done]
        with torch.inference_mode():
            tokens, logprobs = sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                            [s.prompt_ids for s in seqs], [s.output_ids for s in seqs],
                                            ops=self.model.ops,
                                            mask=token_mask([s.guide for s in seqs], logits.shape[1]))
        results: list = [None] * len(chunks)
        for row, token, logprob in zip(done, tokens, logprobs):
            results[row] = (token, logprob)
        return results

    def step(self, chunks: list[ScheduledChunk]) -> list:
        return self.collect(self.launch(chunks))

    # ---- stats and shutdown ----
    def expert_load(self, max_age: float = 1.0) -> dict[int, list[int]]:
        """Per-layer, per-expert tokens routed since start, summed over stages (refreshed at most every max_age s)."""
        if self.failure.reason is not None or self.stopped:
            return table_to_dict(self._stats)
        now = time.monotonic()
        if now - self._stats_at >= max_age or not self._stats.numel():
            self._broadcast(torch.tensor([CMD_STATS] + [0] * (_HEADER - 1), dtype=torch.long), None)
            table = expert_load_table(self.model, self.state)
            dist.reduce(table, 0, group=self.state.control_group)
            self._stats, self._stats_at = table, now
        return table_to_dict(self._stats)

    def stop(self) -> None:
        if self.stopped or self.failure.reason is not None:
            self.stopped = True
            return
        self.stopped = True
        try:
            self._broadcast(torch.tensor([CMD_STOP] + [0] * (_HEADER - 1), dtype=torch.long), None)
            self.control.flush()
            self.sender.flush()
        except (RuntimeError, dist.DistError):
            pass


def worker_loop(model: CausalLM, cache: PagedKVCache, state: ParallelState) -> None:
    """Run steps as rank 0 sends them, until told to stop (or rank 0 is gone)."""
    sender = StageSender()
    header = torch.empty(_HEADER, dtype=torch.long)
    device = state.device
    while True:
        dist.recv(header, 0, group=state.control_group)
        command = int(header[0])
        if command == CMD_STOP:
            sender.flush()
            return
        if command == CMD_STATS:
            dist.reduce(expert_load_table(model, state), 0, group=state.control_group)
            continue
        payload = torch.empty(payload_size(header), dtype=torch.long)
        dist.recv(payload, 0, group=state.control_group)
        token_ids, positions, batch, last = decode_step(header, payload, device)
        cache.set_batch(batch)
        with torch.inference_mode():
            logits = run_stage(model, state, cache, token_ids, positions, last, sender)
        if logits is not None and state.config.pp > 1 and state.local_rank == 0:
            sender.send(logits, 0, TAG_LOGITS)
