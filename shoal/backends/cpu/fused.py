"""shoal's fused CPU operations for the small per-layer work of decode (csrc/fused.c): RMSNorm with the
residual add, SiLU-and-multiply, and one-query attention over the KV cache with rotary and the cache
write folded in (for grouped-query attention, and for DeepSeek's Multi-head Latent Attention with the
latent's norm and the kv_b_proj absorption folded in too).

A batch-1 decode step runs each of these on a few thousand values, where aten spends its time on
dispatch (a few microseconds per operator, several operators per step of the layer) rather than on
arithmetic; one ctypes call replaces each group. Built like csrc/gemv.c: compiled at first use with the
system's C compiler, cached per source and machine in ~/.cache/shoal/kernels, linked into torch's
OpenMP runtime. Where it cannot be built, or SHOAL_CPU_KERNELS=0 (all of shoal's CPU kernels) or
SHOAL_CPU_OPS=0 (these alone), `library()` is None and every caller keeps its torch code.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from shoal.backends.cpu.build import switched_off
from shoal.backends.cpu.capture import StepRef, call, recording
from shoal.backends.cpu.library import kernels

DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled operations (library.py), or None where they cannot be built here (the reason is logged
    once) or SHOAL_CPU_KERNELS=0 / SHOAL_CPU_OPS=0."""
    return None if switched_off("SHOAL_CPU_OPS") else kernels()


def available() -> bool:
    return library() is not None


def _check(code: int, name: str) -> None:
    if code != 0:
        raise RuntimeError(f"shoal CPU operation {name} failed (code {code}); this is a bug in shoal")


def accepts(x: torch.Tensor) -> bool:
    """Whether these operations take x: a contiguous float32 or bf16 CPU tensor, with the library built."""
    return x.dtype in DTYPES and x.device.type == "cpu" and x.is_contiguous() and library() is not None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight * dtype(s * rsqrt(mean(s^2) + eps)), s) with s = x + residual (or x, and None for it).
    x, residual and weight share one dtype (see `accepts`)."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else None
    lib = library()
    _check(call(lib.shoal_rms_norm, "shoal_rms_norm",
                x.data_ptr(), residual.data_ptr() if residual is not None else None,
                res_out.data_ptr() if res_out is not None else None, weight.data_ptr(), out.data_ptr(),
                x.numel() // n, n, float(eps), DTYPES[x.dtype], torch.get_num_threads(),
                keep=(x, residual, res_out, weight, out)), "rms_norm")
    return out, res_out


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
    """x [rows, heads * dim] (rows may be strided, each row's values contiguous) -> each head's values
    RMS-normed with weight [dim]: contiguous [rows, heads * dim], in x's dtype (see `accepts`)."""
    rows, width = x.shape
    out = torch.empty(rows, width, dtype=x.dtype)
    lib = library()
    _check(call(lib.shoal_head_rms_norm, "shoal_head_rms_norm", x.data_ptr(), x.stride(0), rows, heads,
                width // heads, weight.data_ptr(), float(eps), out.data_ptr(), DTYPES[x.dtype], torch.get_num_threads(),
                keep=(x, weight, out)), "head_rms_norm")
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * inter] (gate then up) -> dtype(silu(gate)) * up, [..., inter]."""
    inter = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype)
    lib = library()
    _check(call(lib.shoal_silu_mul, "shoal_silu_mul",
                x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], inter, DTYPES[x.dtype], torch.get_num_threads(),
                keep=(x, out)), "silu_mul")
    return out


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b for contiguous a [..., n] and b of a's shape or [n] (a bias), one dtype (see `accepts`):
    each sum rounded to the dtype as torch's add rounds it."""
    n = a.shape[-1]
    out = torch.empty_like(a)
    rows = a.numel() // n if n else 0
    lib = library()
    _check(call(lib.shoal_add, "shoal_add", a.data_ptr(), b.data_ptr(), out.data_ptr(), rows, n,
                1 if b.dim() == 1 else rows, DTYPES[a.dtype], torch.get_num_threads(), keep=(a, b, out)), "add")
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x.max(dim=-1).indices for a 2-D float32 / bf16 CPU tensor in one pass (greedy sampling over the
    vocabulary, without converting bf16 logits to float32 first), or None where the kernel does not take
    it."""
    if not (available() and x.dim() == 2 and x.dtype in DTYPES and x.device.type == "cpu" and x.shape[1] > 0):
        return None
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib = library()
    _check(call(lib.shoal_argmax_rows, "shoal_argmax_rows", x.data_ptr(), x.shape[0], x.shape[1], DTYPES[x.dtype],
                out.data_ptr(), torch.get_num_threads()), "argmax_rows")
    return out


GROUP_MODES = {None: 0, "group_limited_greedy": 1, "noaux_tc": 2}  # how a router ranks its expert groups


def moe_route(x: torch.Tensor, weight: torch.Tensor, top_k: int, sigmoid: bool, bias: torch.Tensor | None,
              norm: bool, scaling: float, load: torch.Tensor | None = None, groups: int = 1, topk_groups: int = 1,
              group_method: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A MoE router in one call (see shoal_moe_route in csrc/fused.c): x [tokens, hidden] float32 / bf16,
    weight float32 [experts, hidden] -> (weights float32, expert ids) [tokens, top_k], counting the choices
    into load (int64 [experts]) when given; with group_method ("group_limited_greedy", V2; "noaux_tc", V3)
    only the experts of the best topk_groups of `groups` groups are chosen. None where the kernel does not
    take it."""
    if not (available() and x.dim() == 2 and x.dtype in DTYPES and x.device.type == "cpu"
            and weight.dtype == torch.float32 and weight.shape[0] <= 1024 and weight.shape[1] == x.shape[1]
            and (bias is None or bias.dtype == torch.float32)
            and (load is None or (load.dtype == torch.long and load.is_contiguous()))
            and group_method in GROUP_MODES and (group_method is None or groups <= 64)):
        return None
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    tokens = x.shape[0]
    weights = torch.empty(tokens, top_k, dtype=torch.float32)
    ids = torch.empty(tokens, top_k, dtype=torch.long)
    lib = library()
    _check(call(lib.shoal_moe_route, "shoal_moe_route",
                x.data_ptr(), DTYPES[x.dtype], tokens, x.shape[1], weight.data_ptr(), weight.shape[0], int(sigmoid),
                bias.data_ptr() if bias is not None else None, top_k, int(norm), float(scaling), groups, topk_groups,
                GROUP_MODES[group_method], weights.data_ptr(), ids.data_ptr(),
                load.data_ptr() if load is not None else None, torch.get_num_threads(),
                keep=(x, weight, bias, weights, ids, load)), "moe_route")
    return weights, ids


class DecodeAttention:
    """One decode step's per-sequence layout for `shoal_decode_attention` (one new token per sequence),
    built once per forward by the cache: positions, the slot each token writes, each sequence's context
    slots and lengths, as int64 tensors kept alive here."""

    def __init__(self, positions: torch.Tensor, slot_mapping: torch.Tensor, context_slots: torch.Tensor,
                 context_lens: torch.Tensor, sliding_window: int | None, dtype: torch.dtype) -> None:
        self.positions = positions.reshape(-1).contiguous()
        self.slot_mapping = slot_mapping.reshape(-1).contiguous()
        self.context_slots = context_slots.contiguous()
        self.context_lens = context_lens.reshape(-1).contiguous()
        self.seqs = self.positions.numel()
        self.window = int(sliding_window or 0)
        self.dtype = dtype  # of the cache, which q, k and v must share
        self.threads = torch.get_num_threads()
        self._ptrs = (self.positions.data_ptr(), self.slot_mapping.data_ptr(), self.context_slots.data_ptr(),
                      self.context_slots.shape[1], self.context_lens.data_ptr())
        # One past the largest position: the rotary tables must cover it (RotaryEmbedding.tables).
        self.position_end = int(self.positions.max()) + 1 if self.seqs else 0

    def pointers(self) -> tuple[int, int, int, int, int]:
        """(positions, slot_mapping, context_slots, context_slots' row stride, context_lens) for the C side."""
        return self._ptrs

    def _step_args(self) -> tuple[int, ...]:
        """pointers(), marked as what a replayed step rewrites while a step is captured (capture.py)."""
        if not recording():
            return self._ptrs
        return tuple(StepRef(value, field) for field, value in enumerate(self._ptrs))

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, dim: int,
        k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float, cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """q [seqs, heads * dim], k and v [seqs, kv_heads * dim] (rows may be strided: slices of the merged
        qkv output; each row's heads contiguous) -> attention output [seqs, heads * dim]; writes k
        (rotated with cos_sin, float32 tables [positions, dim / 2]) and v to the pools first."""
        out = torch.empty(self.seqs, heads * dim, dtype=q.dtype)
        positions, slots, context, ctx_stride, lens = self._step_args()
        cos, sin = (cos_sin[0].data_ptr(), cos_sin[1].data_ptr()) if cos_sin is not None else (None, None)
        lib = library()
        _check(call(lib.shoal_decode_attention, "shoal_decode_attention",
                    q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), self.seqs, heads,
                    kv_heads, dim, positions, cos, sin, k_pool.data_ptr(), v_pool.data_ptr(), slots, context,
                    ctx_stride, lens, self.window, float(scale), out.data_ptr(), DTYPES[q.dtype], self.threads,
                    keep=(q, k, v, k_pool, v_pool, out, *(cos_sin or ())),
                    table_rows=cos_sin[0].shape[0] if cos_sin is not None else None), "decode_attention")
        return out

    def mla(
        self, q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, kv_b_weight: torch.Tensor,
        heads: int, nope: int, rope: int, rank: int, v_dim: int, pool: torch.Tensor, scale: float,
        cos_sin: tuple[torch.Tensor, torch.Tensor], interleaved: bool,
    ) -> torch.Tensor:
        """Multi-head Latent Attention for one new token per sequence (weight-absorbed, as DeepSeek decodes):
        q [seqs, heads * (nope + rope)] (the query projection's rows, rope part not yet rotated), kv [seqs,
        rank + rope] (kv_a_proj_with_mqa's rows: the latent before its RMSNorm (norm_weight, eps) and the
        shared rotary key before rotation; rows may be strided), kv_b_weight [heads * (nope + v_dim), rank]
        (kv_b_proj's weight, contiguous), pool [slots, rank + rope] -> [seqs, heads * v_dim]. Writes the
        normed latent and the rotated key to the pool first. All in one dtype, `self.dtype`."""
        out = torch.empty(self.seqs, heads * v_dim, dtype=q.dtype)
        positions, slots, context, ctx_stride, lens = self._step_args()
        lib = library()
        _check(call(lib.shoal_mla_decode_attention, "shoal_mla_decode_attention",
                    q.data_ptr(), q.stride(0), kv.data_ptr(), kv.stride(0), norm_weight.data_ptr(), float(eps),
                    kv_b_weight.data_ptr(), self.seqs, heads, nope, rope, rank, v_dim, positions,
                    cos_sin[0].data_ptr(), cos_sin[1].data_ptr(), int(interleaved), pool.data_ptr(), slots, context,
                    ctx_stride, lens, float(scale), out.data_ptr(), DTYPES[q.dtype], self.threads,
                    keep=(q, kv, norm_weight, kv_b_weight, pool, out, *cos_sin), table_rows=cos_sin[0].shape[0]),
               "mla_decode_attention")
        return out
