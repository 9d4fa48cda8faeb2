"""A whole CPU decode step of a Llama-family decoder stack in one C call (csrc/decode.c).

Batch-1 decode runs ~8 small operations per layer between the weight reads; from Python each costs
microseconds of dispatch while the memory idles (one call makes a 0.5B Llama's step 1.4-1.5x faster,
BENCHMARKS.md). `LlamaDecode` describes every layer
to the C side once (weight pointers, norms, cache pools) and then runs a step as one call into the same
kernels Python would call (csrc/gemv.c, csrc/fused.c), so its results are bit for bit those of the
layer-by-layer path. float32 weights take part through their copies packed for MKL (cpu/packed_f32.py),
which the call multiplies with the same `cblas_sgemm_compute` the layers use, for any number of
sequences. The model decides when it applies (shoal/models/llama.py, `fused_decode`).
`TokenExperts` does the same for a lone token's routed MoE experts (shoal/layers/moe.py).
SHOAL_CPU_DECODE=0 (or SHOAL_CPU_KERNELS=0 / SHOAL_CPU_OPS=0) keeps the layer-by-layer path.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from shoal.backends.cpu import gemv as cpu_gemv, fused as cpu_ops, packed_f32 as cpu_packed_f32
from shoal.backends.cpu.build import load, switched_off

SOURCES = (cpu_gemv.SOURCE, cpu_ops.SOURCE, Path(__file__).parent / "csrc" / "decode.c")
WEIGHT_BF16, WEIGHT_INT8, WEIGHT_INT4, WEIGHT_F32_PACKED = 0, 1, 2, 3
# Sequences per step the call takes where every weight is float32 packed for MKL (which takes any count):
# the engine's largest batches.
F32_PACKED_ROWS = 1024

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class DecodeLinear(ctypes.Structure):
    _fields_ = [("kind", _i64), ("weight", _p), ("scale", _p), ("zero", _p), ("scale_bf16", _i64), ("group", _i64),
                ("bias", _p), ("n", _i64), ("k", _i64)]


class DecodeLayer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_attention_norm", _p), ("qkv", DecodeLinear), ("o", DecodeLinear),
                ("gate_up", DecodeLinear), ("down", DecodeLinear), ("k_pool", _p), ("v_pool", _p)]


class DecodeModel(ctypes.Structure):
    _fields_ = [("layers", _i64), ("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64),
                ("intermediate", _i64), ("eps", _f32), ("scale", _f32), ("dtype", _i64), ("final_norm", _p)]


class DecodeStep(ctypes.Structure):
    _fields_ = [("rows", _i64), ("positions", _p), ("slot_mapping", _p), ("context_slots", _p),
                ("context_lens", _p), ("ctx_stride", _i64), ("window", _i64), ("cos", _p), ("sin", _p)]


class MlaLayer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_attention_norm", _p), ("q_a_norm", _p), ("kv_a_norm", _p), ("kv_b", _p),
                ("q", DecodeLinear), ("q_a", DecodeLinear), ("q_b", DecodeLinear), ("kv_a", DecodeLinear),
                ("o", DecodeLinear), ("pool", _p)]


class DeepseekMlp(ctypes.Structure):
    """One DeepSeek layer's MLP for `shoal_deepseek_decode` (csrc/decode.c): dense, or a MoE layer's router,
    routed experts and shared experts."""

    _fields_ = [("moe", _i64), ("gate_up", DecodeLinear), ("down", DecodeLinear), ("expert_gate_up", _p),
                ("expert_down", _p), ("num_experts", _i64), ("inter", _i64), ("shared_gate_up", _p),
                ("shared_down", _p), ("router", _p), ("router_bias", _p), ("top_k", _i64), ("sigmoid", _i64),
                ("norm", _i64), ("scaling", _f32), ("load", _p)]


class MlaModel(ctypes.Structure):
    _fields_ = [("hidden", _i64), ("heads", _i64), ("nope", _i64), ("rope", _i64), ("rank", _i64), ("v_dim", _i64),
                ("q_lora_rank", _i64), ("interleaved", _i64), ("eps", _f32), ("scale", _f32), ("dtype", _i64)]


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled decode step, or None where it cannot be built here or is switched off."""
    if switched_off("SHOAL_CPU_OPS", "SHOAL_CPU_DECODE") or not cpu_gemv.available() or not cpu_ops.available():
        return None
    lib = load(SOURCES, "whole-step decode")
    if lib is None:
        return None
    lib.shoal_llama_decode.argtypes = [ctypes.POINTER(DecodeModel), ctypes.POINTER(DecodeLayer),
                                       ctypes.POINTER(DecodeStep), _p, _p, ctypes.c_int]
    lib.shoal_llama_decode.restype = ctypes.c_int
    lib.shoal_decode_use_amx.argtypes = [ctypes.c_int]
    lib.shoal_decode_use_amx.restype = None
    lib.shoal_decode_use_amx(int(cpu_gemv.rows_use_amx()))
    lib.shoal_decode_use_sgemm.argtypes = [_p]
    lib.shoal_decode_use_sgemm.restype = None
    lib.shoal_decode_use_sgemm(cpu_packed_f32.compute_address())
    linear_ptr = ctypes.POINTER(DecodeLinear)
    lib.shoal_moe_token.argtypes = [linear_ptr, linear_ptr, _i64, _i64, _p, _p, linear_ptr, linear_ptr, _p, _i64, _i64,
                                    _p, ctypes.c_int, ctypes.c_int]
    lib.shoal_gated_mlp.argtypes = [linear_ptr, linear_ptr, _p, _i64, _p, ctypes.c_int, ctypes.c_int]
    lib.shoal_mla_attention_half.argtypes = [ctypes.POINTER(MlaModel), ctypes.POINTER(MlaLayer),
                                             ctypes.POINTER(DecodeStep), _p, _p, _p, ctypes.c_int]
    lib.shoal_deepseek_decode.argtypes = [ctypes.POINTER(MlaModel), ctypes.POINTER(MlaLayer), ctypes.POINTER(DeepseekMlp),
                                          _i64, ctypes.POINTER(DecodeStep), _p, _p, _p, ctypes.c_int]
    for fn in (lib.shoal_moe_token, lib.shoal_gated_mlp, lib.shoal_mla_attention_half, lib.shoal_deepseek_decode):
        fn.restype = ctypes.c_int
    return lib


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"shoal's CPU {what} failed (code {code}); this is a bug in shoal")


def weight_descriptor(fmt: str | None, kernel: str | None, t: dict[str, torch.Tensor], group_size: int,
                      dtype: torch.dtype, bias: torch.Tensor | None = None,
                      packed: cpu_packed_f32.PackedF32 | None = None) -> DecodeLinear | None:
    """How the C side reads one weight: `t` holds {"weight": bf16 [N, K]} (fmt None) or a quantized
    layer's tensors in its kernel's layout (fmt "int8" / "int4", kernel "int8-gemv" / "int4-gemv"); a
    float32 weight {"weight": float32 [N, K]} is read through `packed`, its copy packed for MKL, which the
    layer's own forward multiplies with too. None where the kernels would not take it exactly as the
    layer's own forward does."""
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        return None
    bias_ptr = bias.data_ptr() if bias is not None else None
    if fmt is None and dtype == torch.float32:
        if packed is None or not packed.packs(t["weight"]) or cpu_packed_f32.compute_address() is None:
            return None
        return DecodeLinear(WEIGHT_F32_PACKED, packed.buffer.data_ptr(), None, None, 0, 0, bias_ptr, packed.n, packed.k)
    if fmt is None:
        w = t["weight"]
        if w.dtype != torch.bfloat16 or dtype != torch.bfloat16 or not w.is_contiguous() or w.device.type != "cpu":
            return None
        n, k = w.shape
        return DecodeLinear(WEIGHT_BF16, w.data_ptr(), None, None, 0, 0, bias_ptr, n, k)
    if not all(v.is_contiguous() and v.device.type == "cpu" for v in t.values()):
        return None
    if fmt == "int8" and kernel == "int8-gemv" and "scales_f32" in t and t["qweight"].shape[1] % 16 == 0:
        n, k = t["qweight"].shape
        return DecodeLinear(WEIGHT_INT8, t["qweight"].data_ptr(), t["scales_f32"].data_ptr(), None, 0, 0, bias_ptr, n, k)
    if fmt == "int4" and kernel == "int4-gemv" and "qweight_gemv" in t:
        scales = t["scales"]
        n, k = t["qweight_gemv"].shape[0], t["qweight_gemv"].shape[1] * 2
        return DecodeLinear(WEIGHT_INT4, t["qweight_gemv"].data_ptr(), scales.data_ptr(), t["zeros"].data_ptr(),
                            int(scales.dtype == torch.bfloat16), group_size, bias_ptr, n, k)
    return None


def linear_descriptor(module: torch.nn.Module, dtype: torch.dtype) -> tuple[DecodeLinear, list[torch.Tensor]] | None:
    """`weight_descriptor` for a linear layer (and the tensors to keep alive), or None for any layer but
    a plain or a quantized Linear (a tensor-parallel split, for one)."""
    from shoal.layers.linear import Linear, MergedLinear
    from shoal.quant.layers import QuantizedLinear

    bias, packed = getattr(module, "bias", None), None
    if type(module) in (Linear, MergedLinear):
        t, fmt, kernel, group, packed = {"weight": module.weight}, None, None, 0, module.packed_f32
    elif type(module) is QuantizedLinear:
        t, fmt, kernel, group = module._tensors(""), module.fmt, module.kernel.name, module.group_size
    else:
        return None
    t = {name: p.data for name, p in t.items()}
    described = weight_descriptor(fmt, kernel, t, group, dtype, bias, packed)
    keep = list(t.values()) + ([packed.buffer] if packed is not None else []) + ([bias] if bias is not None else [])
    return None if described is None else (described, keep)


class TokenExperts:
    """One MoE layer's routed experts for `shoal_moe_token`: a lone token's chosen experts (gate_up, SiLU,
    down, weighted sum; and the shared experts, where given) in one call. `build` returns None where any
    expert's weights are not ones the kernels take."""

    def __init__(self, gate_up: list[DecodeLinear], down: list[DecodeLinear], inter: int, keep: list) -> None:
        self.num_experts = len(gate_up)
        self.gate_up = (DecodeLinear * len(gate_up))(*gate_up)
        self.down = (DecodeLinear * len(down))(*down)
        self.inter = inter
        self._keep = keep

    @classmethod
    def build(cls, fmt: str | None, kernel: str | None, experts: list[tuple[dict, dict]], group_size: int,
              dtype: torch.dtype) -> TokenExperts | None:
        """experts: each expert's (gate_up, down) tensors, as `weight_descriptor` takes them."""
        if library() is None or dtype not in cpu_ops.DTYPES or not experts:
            return None
        gate_up = [weight_descriptor(fmt, kernel, g, group_size, dtype) for g, _ in experts]
        down = [weight_descriptor(fmt, kernel, d, group_size, dtype) for _, d in experts]
        if any(d is None for d in gate_up + down):
            return None
        return cls(gate_up, down, down[0].k, experts)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                 shared: tuple[DecodeLinear, DecodeLinear] | None = None, threads: int | None = None) -> torch.Tensor | None:
        """x [1, hidden] (contiguous, this layer's dtype), weights float32 [1, top_k], expert_ids [1, top_k]
        -> the weighted sum [1, hidden], plus the shared experts' gated MLP (gate_up, down) where given; or
        None where the inputs are not ones the call takes."""
        if x.shape[0] != 1 or weights.dtype != torch.float32 or expert_ids.dtype != torch.int64 \
                or expert_ids.shape[1] > 64 or x.dtype not in cpu_ops.DTYPES or not x.is_contiguous():
            return None
        weights, expert_ids = weights.contiguous(), expert_ids.contiguous()
        out = torch.empty_like(x)
        shared_gate_up, shared_down = (ctypes.byref(shared[0]), ctypes.byref(shared[1])) if shared else (None, None)
        _check(library().shoal_moe_token(
            self.gate_up, self.down, self.num_experts, expert_ids.shape[1], expert_ids.data_ptr(), weights.data_ptr(),
            shared_gate_up, shared_down, x.data_ptr(), x.shape[1], self.inter, out.data_ptr(), cpu_ops.DTYPES[x.dtype],
            threads or torch.get_num_threads(),
        ), "MoE token step")
        return out


def batched_rows(dtype: torch.dtype, bf16_weights: bool) -> int:
    """The most sequences a decode call takes: the matrix-vector kernels' 8, and beyond them as many as
    cpu_gemv's batched kernels take for every weight of the stack, exactly where the layer-by-layer path
    uses them too (cpu_gemv.rows_kernel_takes), so that both give the same bits."""
    if dtype != torch.bfloat16 or not cpu_gemv.rows_kernels_available():
        return cpu_gemv.MAX_ROWS
    if cpu_gemv.rows_use_amx():
        return cpu_gemv.ROWS_MAX
    return cpu_gemv.MAX_ROWS if bf16_weights else cpu_gemv.ROWS_MAX_WITHOUT_AMX


class LlamaDecode:
    """A Llama-family decoder stack described once for `shoal_llama_decode`.

    `layers` holds per layer (input_norm weight, post_attention_norm weight, qkv, o, gate_up, down
    modules). Build with `build`, which returns None where any part is not one the C step takes.
    """

    def __init__(self, model: DecodeModel, layers: list[DecodeLayer], keep: list[torch.Tensor], max_rows: int,
                 packed: list[cpu_packed_f32.PackedF32]) -> None:
        self.model = model
        self.layers = (DecodeLayer * len(layers))(*layers)
        self._keep = keep  # the tensors whose memory the descriptors point into
        self._pools: tuple[int, ...] | None = None
        self.max_rows = max_rows  # sequences per step the call takes
        self._packed = packed  # float32 weights' packed copies the layers read (none for other dtypes)

    def is_current(self) -> bool:
        """False once a packed float32 weight has changed in place since it was packed: the copy the call
        would read is stale (the layer-by-layer path then multiplies the weight itself)."""
        return all(p.is_current() for p in self._packed)

    @classmethod
    def build(cls, *, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float,
              scale: float, dtype: torch.dtype, final_norm: torch.Tensor, layers: list[tuple]) -> LlamaDecode | None:
        if library() is None or dtype not in cpu_ops.DTYPES:
            return None
        keep: list[torch.Tensor] = [final_norm]
        described = []
        packed = [m.packed_f32 for _, _, *linears in layers for m in linears if getattr(m, "packed_f32", None)]
        for input_norm, post_norm, *linears in layers:
            parts = [linear_descriptor(module, dtype) for module in linears]
            norms = (input_norm, post_norm)
            if any(p is None for p in parts) or any(w.dtype != dtype or not w.is_contiguous() for w in norms):
                return None
            for _, tensors in parts:
                keep.extend(tensors)
            keep.extend(norms)
            described.append(DecodeLayer(input_norm.data_ptr(), post_norm.data_ptr(), *(p[0] for p in parts), None, None))
        if final_norm.dtype != dtype or not final_norm.is_contiguous():
            return None
        model = DecodeModel(len(layers), hidden, heads, kv_heads, head_dim, intermediate, eps, scale,
                            cpu_ops.DTYPES[dtype], final_norm.data_ptr())
        kinds = {d.kind for layer in described for d in (layer.qkv, layer.o, layer.gate_up, layer.down)}
        rows = F32_PACKED_ROWS if kinds == {WEIGHT_F32_PACKED} else batched_rows(dtype, WEIGHT_BF16 in kinds)
        return cls(model, described, keep, rows, packed)

    def run(self, x: torch.Tensor, step: cpu_ops.DecodeAttention, pools: list[list[torch.Tensor]],
            cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [rows, hidden] embeddings (one new token per sequence, rows <= self.max_rows) -> the final
        norm's output [rows, hidden]; writes every layer's keys and values to `pools` (per layer [k, v])."""
        key = tuple(p.data_ptr() for layer in pools for p in layer[:2])
        if key != self._pools:
            for layer, (k_pool, v_pool) in zip(self.layers, pools):
                layer.k_pool, layer.v_pool = k_pool.data_ptr(), v_pool.data_ptr()
            self._pools = key
        stream = x.reshape(-1, self.model.hidden).clone()  # becomes the residual stream
        out = torch.empty_like(stream)
        desc = _step_descriptor(step, cos_sin)
        _check(library().shoal_llama_decode(ctypes.byref(self.model), self.layers, ctypes.byref(desc),
                                            stream.data_ptr(), out.data_ptr(), step.threads), "decode step")
        return out


def _step_descriptor(step: cpu_ops.DecodeAttention, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> DecodeStep:
    positions, slots, context, ctx_stride, lens = step.pointers()
    return DecodeStep(step.seqs, positions, slots, context, lens, ctx_stride, step.window,
                      cos_sin[0].data_ptr(), cos_sin[1].data_ptr())


class DeepseekDecode:
    """A DeepSeek decoder stack described once for the C side: per layer, the attention half
    (`shoal_mla_attention_half`) and the MLP half (`shoal_gated_mlp` for a dense layer or a MoE layer's
    shared experts, `shoal_moe_token` for a lone token's routed and shared experts) are one call each,
    with the router run between them by the model (shoal/models/deepseek.py, `fused_decode`). A lone
    token's whole step is one call (`run_token`, shoal_deepseek_decode) where every MoE layer's router is
    one the C router takes (`whole` is then set)."""

    def __init__(self, model: MlaModel, layers: list[MlaLayer], mlps: list[tuple | None], keep: list,
                 whole: ctypes.Array | None = None) -> None:
        self.model = model
        self.layers = (MlaLayer * len(layers))(*layers)  # one array: the whole-step call reads them all
        self.mlps = mlps  # per layer: (gate_up, down) of a dense MLP, (routed TokenExperts, shared (gate_up, down) or None)
        self._keep = keep
        self.whole = whole  # DeepseekMlp per layer, or None
        self._pools: tuple[int, ...] | None = None
        self.max_rows = cpu_gemv.MAX_ROWS  # sequences per step the calls take

    @classmethod
    def build(cls, *, hidden: int, heads: int, nope: int, rope: int, rank: int, v_dim: int, q_lora_rank: int,
              interleaved: bool, eps: float, scale: float, dtype: torch.dtype, layers: list[dict]) -> DeepseekDecode | None:
        """layers: per layer a dict of the modules and tensors (see DeepseekForCausalLM._describe_cpu_decode);
        "mlp" is ("dense", gate_up, down) or ("moe", TokenExperts, shared gate_up or None, shared down or None,
        the MoE module, for its router)."""
        if library() is None or dtype not in cpu_ops.DTYPES:
            return None
        keep: list = []

        def describe(module) -> DecodeLinear | None:
            if module is None:
                return DecodeLinear()
            described = linear_descriptor(module, dtype)
            # float32 packed weights stay layer by layer here: the halves' float32 path has not been matched
            # bit for bit against the layers' (a lone token's step differs in the last bits), unlike Llama's.
            if described is None or described[0].kind == WEIGHT_F32_PACKED:
                return None
            keep.extend(described[1])
            return described[0]

        def plain(t: torch.Tensor | None) -> bool:
            return t is None or (isinstance(t, torch.Tensor) and t.dtype == dtype and t.is_contiguous()
                                 and t.device.type == "cpu")

        described_layers, mlps = [], []
        for layer in layers:
            tensors = [layer[k] for k in ("input_norm", "post_attention_norm", "q_a_norm", "kv_a_norm", "kv_b")]
            if not all(plain(t) for t in tensors):
                return None
            keep.extend(t for t in tensors if t is not None)
            linears = [describe(layer[k]) for k in ("q", "q_a", "q_b", "kv_a", "o")]
            if any(d is None for d in linears):
                return None
            ptrs = [t.data_ptr() if t is not None else None for t in tensors]
            described_layers.append(MlaLayer(*ptrs, *linears, None))
            kind, *parts = layer["mlp"]
            if kind == "dense":
                pair = (describe(parts[0]), describe(parts[1]))
                if None in pair:
                    return None
                mlps.append(("dense", *pair))
            else:
                routed, shared_gate_up, shared_down, moe = parts
                shared = (describe(shared_gate_up), describe(shared_down)) if shared_gate_up is not None else None
                if shared is not None and None in shared:
                    return None
                mlps.append(("moe", routed, shared, moe))  # routed None: MoE layers run in torch
        model = MlaModel(hidden, heads, nope, rope, rank, v_dim, q_lora_rank or 0, int(interleaved), eps, scale,
                         cpu_ops.DTYPES[dtype])
        return cls(model, described_layers, mlps, keep, _whole_step(mlps))

    def run_token(self, x: torch.Tensor, desc: DecodeStep, final_norm: torch.Tensor, threads: int) -> torch.Tensor:
        """A lone token's embedding [1, hidden] -> the final norm's output [1, hidden], every layer in one
        call (needs `whole`); writes the layers' latent caches and counts the MoE layers' choices."""
        res = x.reshape(1, -1).clone()  # the residual stream
        out = torch.empty_like(res)
        _check(library().shoal_deepseek_decode(
            ctypes.byref(self.model), self.layers, self.whole, len(self.whole), ctypes.byref(desc), res.data_ptr(),
            final_norm.data_ptr(), out.data_ptr(), threads,
        ), "DeepSeek decode step")
        return out

    def begin(self, pools: list[torch.Tensor], step: cpu_ops.DecodeAttention,
              cos_sin: tuple[torch.Tensor, torch.Tensor]) -> DecodeStep:
        """This step's descriptor; `pools` are the layers' latent caches (re-read when the cache moved)."""
        key = tuple(p.data_ptr() for p in pools)
        if key != self._pools:
            for layer, pool in zip(self.layers, pools):
                layer.pool = pool.data_ptr()
            self._pools = key
        return _step_descriptor(step, cos_sin)

    def attention_half(self, index: int, step: DecodeStep, res: torch.Tensor, mlp: torch.Tensor | None,
                       threads: int) -> torch.Tensor:
        """Layer `index` up to its MLP: updates the residual stream `res` [rows, hidden] in place (adding
        the previous layer's MLP output `mlp` first, where given) and returns the MLP's input [rows, hidden]."""
        h = torch.empty_like(res)
        _check(library().shoal_mla_attention_half(
            ctypes.byref(self.model), ctypes.byref(self.layers[index]), ctypes.byref(step), res.data_ptr(),
            mlp.data_ptr() if mlp is not None else None, h.data_ptr(), threads,
        ), "MLA decode step")
        return h

    def dense_mlp(self, index: int, h: torch.Tensor, threads: int) -> torch.Tensor:
        _, gate_up, down = self.mlps[index]
        out = torch.empty(h.shape[0], down.n, dtype=h.dtype)
        _check(library().shoal_gated_mlp(ctypes.byref(gate_up), ctypes.byref(down), h.data_ptr(), h.shape[0],
                                         out.data_ptr(), cpu_ops.DTYPES[h.dtype], threads), "gated MLP")
        return out

    def moe_token(self, index: int, h: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                  threads: int) -> torch.Tensor | None:
        """A lone token's MoE output (routed experts, plus the shared ones) in one call, or None where this
        layer's experts are not ones the call takes."""
        _, routed, shared, _ = self.mlps[index]
        return routed(h, weights, expert_ids, shared, threads) if routed is not None else None


def _whole_step(mlps: list[tuple]) -> ctypes.Array | None:
    """The layers' MLPs as `shoal_deepseek_decode` reads them, or None where a MoE layer's experts or router
    are not ones the C side takes (its router must be what Router.forward runs through cpu_ops.moe_route)."""
    described = []
    for mlp in mlps:
        if mlp[0] == "dense":
            described.append(DeepseekMlp(0, mlp[1], mlp[2]))
            continue
        _, routed, shared, moe = mlp
        if moe is None:  # a MoE layer of another kind (split across ranks, say) keeps its own forward
            return None
        gate = moe.gate
        cfg = gate.cfg
        if (routed is None or not (cfg.topk_method == "greedy" or cfg.num_groups <= 1) or cfg.top_k > 64
                or gate.weight.dtype != torch.float32 or not gate.weight.is_contiguous() or cfg.num_experts > 1024
                or not moe.expert_load.is_contiguous()):
            return None
        bias = gate.e_score_correction_bias if cfg.correction_bias else None
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            return None
        scaling = cfg.routed_scaling_factor
        if cfg.scoring != "sigmoid" and cfg.norm_topk_prob and cfg.top_k > 1:
            scaling = 1.0  # as Router.forward: V2 normalises instead of scaling
        described.append(DeepseekMlp(
            1, DecodeLinear(), DecodeLinear(), ctypes.addressof(routed.gate_up), ctypes.addressof(routed.down),
            routed.num_experts, routed.inter,
            ctypes.addressof(shared[0]) if shared else None, ctypes.addressof(shared[1]) if shared else None,
            gate.weight.data_ptr(), bias.data_ptr() if bias is not None else None, cfg.top_k,
            int(cfg.scoring == "sigmoid"), int(cfg.norm_topk_prob), scaling, moe.expert_load.data_ptr(),
        ))
    return (DeepseekMlp * len(described))(*described)
