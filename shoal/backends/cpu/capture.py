"""Record one eager decode step's kernel calls, then replay them in one C call: the CPU backend's
counterpart of capturing a CUDA graph. It knows the kernels, never the model.

A decode step of a 0.5B model is ~300 small kernel calls; from Python each costs microseconds of
interpreter and dispatch while the memory idles. `StepGraphs` (handed out by `CpuOps.step_graphs`, run
by CausalLM.forward for a step of one new token per sequence) captures the first step of each batch
size: it runs the model's layers eagerly with every kernel call also written down (`call` below), under
a torch dispatch mode that refuses the capture if any torch operator other than a view or an empty
allocation runs — such a step (a router with expert groups, say) keeps running eagerly. Later steps of
that size replay the list in C (csrc/replay.c): the same kernels with the same arguments in the same
order, so the same bits as the eager step.

What changes between steps: the input (copied into the captured input buffer), the step's positions,
cache slots and context (the arguments marked `StepRef`, rewritten before each replay), and nothing
else. The step's intermediate tensors are laid out once in one arena per captured size (by their first
and last use), so a graph holds a step's peak working memory, not every intermediate of the step.
"""

from __future__ import annotations

import ctypes
import struct
import weakref
from collections import Counter
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shoal.backends.cpu.library import SIGNATURES

# csrc/replay.c's OP_* kinds
OPS = {
    "shoal_rms_norm": 1, "shoal_silu_mul": 2, "shoal_add": 3, "shoal_decode_attention": 4,
    "shoal_mla_decode_attention": 5, "shoal_moe_route": 6, "shoal_gemv_bf16": 7, "shoal_gemv_int8": 8,
    "shoal_gemv_int4": 9, "shoal_matmul_rows_bf16": 10, "shoal_matmul_rows_int8": 11,
    "shoal_matmul_rows_int4": 12, "shoal_moe_token": 13, "cblas_sgemm_compute": 14, "shoal_head_rms_norm": 15,
    "shoal_moe_tokens": 16,
}
# Which arguments are pointers (relocated into the arena when they point into a step's intermediate).
_POINTER_ARGS = {name: {i for i, t in enumerate(SIGNATURES[name]) if t is ctypes.c_void_p}
                 for name in OPS if name in SIGNATURES}
# cblas_sgemm_compute is recorded as (its address, layout, transa, transb, m, n, k, a, lda, b, ldb, beta, c, ldc)
_POINTER_ARGS["cblas_sgemm_compute"] = {7, 9, 12}

ALIGN = 64  # arena offsets start on a cache line, as torch's CPU allocations do (MKL may round otherwise)


class StepRef(int):
    """An argument that changes from step to step: its value now, and `field`, its index in the step's
    pointers (fused.DecodeAttention.pointers())."""

    def __new__(cls, value: int, field: int):
        ref = super().__new__(cls, value)
        ref.field = field
        return ref


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list]] = []
        self.keep: list = []
        self.table_rows: int | None = None  # the fewest positions a rotary table read by the step covers
        self.failed: str | None = None


_recording: _Recorder | None = None


def recording() -> bool:
    """Whether a step is being captured (callers then mark their step arguments with StepRef)."""
    return _recording is not None


def call(fn, name: str, *args, keep=(), table_rows: int | None = None) -> int:
    """fn(*args), a kernel call, written down too while a step is captured. `keep`: tensors the
    arguments point into; `table_rows`: for a call that reads rotary tables, the positions they cover."""
    rec = _recording
    if rec is not None:
        if name not in OPS:
            rec.failed = rec.failed or f"{name} cannot be replayed"
        else:
            rec.calls.append((name, list(args)))
            rec.keep.extend(t for t in keep if t is not None)
            if table_rows is not None:
                rec.table_rows = table_rows if rec.table_rows is None else min(rec.table_rows, table_rows)
    return fn(*args)


class _OnlyKernels(TorchDispatchMode):
    """Refuses a capture where torch computes anything itself (it would not be replayed); notes every
    allocation, which becomes a slot of the arena."""

    _ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default}

    def __init__(self) -> None:
        super().__init__()
        self.failed: str | None = None
        self.allocated: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self._ALLOCATIONS:
            self.allocated.append(out)
        elif not (func.is_view and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor)
                  and out.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr()):
            self.failed = self.failed or f"torch ran {func} (not a kernel the replay knows)"
        return out


def _float_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


class StepGraph:
    """One captured decode step of a given batch size: its calls as csrc/replay.c reads them."""

    def __init__(self, rec: _Recorder, allocated: list[torch.Tensor], x: torch.Tensor, out: torch.Tensor,
                 replay) -> None:
        self._replay = replay
        # The intermediates: each allocation's storage, its first and last use (the output lives to the end).
        slots: dict[int, list] = {}
        for t in allocated:
            storage = t.untyped_storage()
            slots.setdefault(storage.data_ptr(), [storage.nbytes(), None, None])
        ranges = sorted((base, base + info[0]) for base, info in slots.items())
        starts = [r[0] for r in ranges]

        def slot_of(value: int) -> int | None:
            i = int(np.searchsorted(starts, value, side="right")) - 1
            return ranges[i][0] if i >= 0 and value < ranges[i][1] else None

        words, relocate, patches = [], [], []
        for index, (name, args) in enumerate(rec.calls):
            pointers = _POINTER_ARGS[name]
            words += [OPS[name], len(args)]
            for position, arg in enumerate(args):
                if isinstance(arg, StepRef):
                    patches.append((len(words), arg.field))
                if isinstance(arg, float):
                    words.append(_float_bits(arg))
                    continue
                value = 0 if arg is None else int(arg)
                base = slot_of(value) if position in pointers and value else None
                if base is not None:
                    info = slots[base]
                    info[1] = index if info[1] is None else info[1]
                    info[2] = index
                    relocate.append((len(words), base, value - base))
                words.append(value)
        out_base = out.untyped_storage().data_ptr()
        if out_base in slots:
            slots[out_base][2] = len(rec.calls)
        # Lay the used intermediates out in one arena: first fit by first use, reusing what is dead.
        placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
        offsets: dict[int, int] = {}
        for base, (size, first, last) in sorted(slots.items(), key=lambda kv: (kv[1][1] is None, kv[1][1] or 0)):
            if first is None:
                continue
            size = -(-size // ALIGN) * ALIGN
            offset = 0
            for o, end, f, l in sorted(placed):
                if l < first or f > last:  # not alive at the same time
                    continue
                if offset + size <= o:
                    break
                offset = max(offset, end)
            placed.append((offset, offset + size, first, last))
            offsets[base] = offset
        arena_bytes = max((end for _, end, _, _ in placed), default=0)
        self.arena = torch.empty(arena_bytes + ALIGN, dtype=torch.uint8)
        start = -(-self.arena.data_ptr() // ALIGN) * ALIGN
        self.words = np.array(words, dtype=np.int64)
        for at, base, inner in relocate:
            self.words[at] = start + offsets[base] + inner
        self._patch_at = np.array([at for at, _ in patches], dtype=np.int64)
        self._patch_field = np.array([field for _, field in patches], dtype=np.int64)
        self.count = len(rec.calls)
        self.table_rows = rec.table_rows
        self._keep = [t for t in rec.keep if t.untyped_storage().data_ptr() not in offsets]  # weights, pools, tables
        self.x = x  # the captured input buffer (allocated before the capture: not in the arena)
        if out_base in offsets:
            shift = start + offsets[out_base] - out_base
            self.out = torch.empty(0, dtype=out.dtype).set_(
                self._arena_storage(), (out.data_ptr() + shift - self.arena.data_ptr()) // out.element_size(),
                out.shape, out.stride())
        else:
            self.out = out

    def _arena_storage(self):
        return self.arena.untyped_storage()

    def covers(self, step) -> bool:
        """Whether this step reads only what the capture did: rotary positions inside the tables it read."""
        return self.table_rows is None or step.position_end <= self.table_rows

    def replay(self, x: torch.Tensor, step) -> torch.Tensor:
        self.x.copy_(x)
        if len(self._patch_at):
            self.words[self._patch_at] = np.asarray(step.pointers(), dtype=np.int64)[self._patch_field]
        code = self._replay(self.words.ctypes.data, self.count)
        if code:
            raise RuntimeError(f"shoal's CPU replay failed at call {code // 256} (code {code % 256}); "
                               "this is a bug in shoal")
        return self.out.clone()


class StepGraphs:
    """Captured decode steps, per KV cache and batch size (one new token per sequence); see the module
    docstring. `captures` and `replays` count captured and replayed steps by batch size; `refused` says why
    a size stays eager."""

    def __init__(self, replay) -> None:
        self._replay = replay  # the library's shoal_replay
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.captures: Counter = Counter()
        self.replays: Counter = Counter()
        self.refused: dict[int, str] = {}

    def __call__(self, cache, x: torch.Tensor, step, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """forward(x) for this step: replayed where a graph of this size was captured, else run eagerly
        (and captured the first time)."""
        graphs = self._graphs.setdefault(cache, {})
        key = (tuple(x.shape), x.dtype)
        graph = graphs.get(key)
        if graph is None:
            graph, out = self._capture(x, forward)
            graphs[key] = graph
            return out
        if isinstance(graph, str):
            return forward(x)
        if not graph.covers(step):  # past the rotary table it read: run eagerly (growing it), capture anew
            del graphs[key]
            return forward(x)
        self.replays[x.shape[0] * x.shape[1]] += 1
        return graph.replay(x, step)

    def _capture(self, x: torch.Tensor, forward):
        global _recording
        static_x = x.clone()
        rec, guard = _Recorder(), _OnlyKernels()
        _recording = rec
        try:
            with guard:
                out = forward(static_x)
        finally:
            _recording = None
        reason = rec.failed or guard.failed or (None if rec.calls else "no kernel ran")
        rows = x.shape[0] * x.shape[1]
        if reason is not None:
            self.refused[rows] = reason
            return reason, out
        self.refused.pop(rows, None)
        self.captures[rows] += 1
        return StepGraph(rec, guard.allocated, static_x, out, self._replay), out
