"""Quantized stand-ins for the layers in shoal.layers: same loading interface (`load_weight`,
`load_shard`, `load_expert`, `checkpoint_names`) and the same forward, with the weight kept in one of
shoal.quant.formats' layouts and multiplied by the kernel the backend hands out for that format.

Each accepts whatever arrives for its weight: a float tensor (quantized here, as it arrives) or an
already-quantized value (copied when it is in this layer's format, else dequantized and re-quantized).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shoal.backends.ops import REFERENCE, Ops
from shoal.errors import WeightError
from shoal.layers.linear import copy_weight
from shoal.layers.moe import weighted_expert_sum
from shoal.quant.formats import FP8_BLOCK, Fp8BlockWeight, Int4GroupWeight, Int8ChannelWeight, as_float

# The canonical tensors of each format (see shoal/backends/quantized_matmul.py for their layouts).
FORMAT_TENSORS = {"int8": ("qweight", "scales"), "int4": ("qweight", "scales", "zeros"), "fp8": ("qweight", "scales")}


def allocate(fmt: str, lead: tuple[int, ...], out: int, n: int, group_size: int, dtype: torch.dtype, device=None):
    """Empty canonical tensors for a [*lead, out, n] weight in `fmt`; scales are kept in `dtype`."""
    if fmt == "int8":
        return {
            "qweight": torch.empty(*lead, out, n, dtype=torch.int8, device=device),
            "scales": torch.empty(*lead, out, dtype=dtype, device=device),
        }
    if fmt == "int4":
        groups = n // group_size
        return {
            "qweight": torch.empty(*lead, out, n // 2, dtype=torch.uint8, device=device),
            "scales": torch.empty(*lead, out, groups, dtype=dtype, device=device),
            "zeros": torch.empty(*lead, out, groups, dtype=dtype, device=device),
        }
    if fmt == "fp8":
        return {
            "qweight": torch.empty(*lead, out, n, dtype=torch.float8_e4m3fn, device=device),
            "scales": torch.empty(*lead, out, math.ceil(n / FP8_BLOCK), dtype=torch.float32, device=device),
        }
    raise ValueError(f"unknown weight format {fmt!r}")


def to_format(fmt: str, value, group_size: int, scale_dtype: torch.dtype, name: str):
    """`value` (tensor or quantized weight) as a quantized weight in `fmt`, converting if needed."""
    if fmt == "int8":
        if isinstance(value, Int8ChannelWeight):
            return value
        return Int8ChannelWeight.quantize(as_float(value), scale_dtype)
    if fmt == "int4":
        if isinstance(value, Int4GroupWeight) and value.group_size == group_size:
            return value
        return Int4GroupWeight.quantize(as_float(value), group_size, scale_dtype, name)
    if isinstance(value, Fp8BlockWeight):
        return value
    return Fp8BlockWeight.quantize(as_float(value))


def store(fmt: str, tensors: dict[str, torch.Tensor], index: tuple, value, group_size: int, name: str) -> None:
    """Write a quantized weight into tensors[...][index] (index selects an expert and / or a row range)."""
    q = to_format(fmt, value, group_size, tensors["scales"].dtype, name)
    target = tuple(tensors["qweight"][index].shape[:-1]) + (tensors["qweight"].shape[-1] * (2 if fmt == "int4" else 1),)
    if tuple(q.shape) != target:
        raise WeightError(
            f"weight {name} has shape {tuple(q.shape)} in the checkpoint but the model expects {target}; "
            "config.json and the weights disagree"
        )
    with torch.no_grad():
        if fmt == "int8":
            tensors["qweight"][index].copy_(q.qweight)
            tensors["scales"][index].copy_(q.scales)
        elif fmt == "int4":
            tensors["qweight"][index].copy_(q.packed)
            tensors["scales"][index].copy_(q.scales)
            tensors["zeros"][index].copy_(q.zeros)
        else:
            rows = q.weight.shape[-2]
            tensors["qweight"][index].copy_(q.weight)
            tensors["scales"][index].copy_(q.scale_inv.repeat_interleave(FP8_BLOCK, dim=-2)[..., :rows, :])


def export(fmt: str, tensors: dict[str, torch.Tensor], index: tuple, group_size: int):
    """The quantized weight at tensors[...][index] as a formats value (canonical layout only)."""
    t = {k: v[index] for k, v in tensors.items()}
    if fmt == "int8":
        return Int8ChannelWeight(t["qweight"], t["scales"])
    if fmt == "int4":
        return Int4GroupWeight(t["qweight"], t["scales"], t["zeros"], group_size)
    return Fp8BlockWeight(t["qweight"], t["scales"][..., ::FP8_BLOCK, :].contiguous())


class _QuantizedModule(nn.Module):
    """Keeps named weight tensors as frozen parameters (so loading checks and memory counts see them)."""

    fmt: str
    group_size: int

    def _register(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            self.register_parameter(prefix + key, nn.Parameter(tensor, requires_grad=False))

    def _tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The weight's tensors (never the bias: a kernel's re-layout must not drop it)."""
        return {
            k[len(prefix):]: p
            for k, p in self._parameters.items()
            if k.startswith(prefix) and p is not None and k != "bias"
        }

    def _prepare(self, prefix: str, kernel, experts: int | None = None) -> None:
        """Re-lay the weight for `kernel` (once, after loading); afterwards it can no longer be exported."""
        prepare = getattr(kernel, "prepare", None)
        if prepare is None:
            return
        tensors = self._tensors(prefix)
        with torch.no_grad():
            if experts is None:
                laid = prepare({k: v.data for k, v in tensors.items()}, self.group_size)
            else:
                each = [prepare({k: v.data[e] for k, v in tensors.items()}, self.group_size) for e in range(experts)]
                laid = {k: torch.stack([d[k] for d in each]) for k in each[0]}
        if laid.keys() == tensors.keys():
            return
        for key in tensors:
            delattr(self, prefix + key)
        self._register(prefix, laid)
        self.canonical = False


class QuantizedLinear(_QuantizedModule):
    """A quantized Linear or MergedLinear: y = x W^T (+ b), W stored in `fmt`."""

    ops: Ops = REFERENCE  # the backend's, once the model is built (its bias add)

    def __init__(
        self,
        fmt: str,
        in_features: int,
        out_sizes: list[int],
        shard_names: tuple[str, ...] | None,
        bias: bool,
        kernel,
        group_size: int = 0,
        dtype: torch.dtype | None = None,
        device=None,
    ) -> None:
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        self.fmt, self.group_size, self.kernel = fmt, group_size, kernel
        self.in_features, self.out_features = in_features, sum(out_sizes)
        self.out_sizes, self.shard_names = list(out_sizes), shard_names
        self._offsets = [0]
        for size in out_sizes:
            self._offsets.append(self._offsets[-1] + size)
        self.canonical = True
        self._register("", allocate(fmt, (), self.out_features, in_features, group_size, dtype, device))
        self.bias = (
            nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self._weight_tensors = None

    # ---- loading ---------------------------------------------------------------------------------
    def checkpoint_names(self, module_name: str, attr: str) -> list[str]:
        if attr == "bias":
            suffix = "bias"
        elif attr == "qweight":
            suffix = "weight"
        else:
            return []  # the scales come with the weight
        if self.shard_names is None:
            return [f"{module_name}.{suffix}"]
        parent = module_name.rpartition(".")[0]
        return [f"{parent}.{shard}.{suffix}" for shard in self.shard_names]

    def load_weight(self, attr: str, loaded, name: str) -> None:
        self._load_rows(attr, 0, self.out_features, loaded, name)

    def load_shard(self, attr: str, shard: str, loaded, name: str) -> None:
        index = self.shard_names.index(shard)
        self._load_rows(attr, self._offsets[index], self._offsets[index + 1], loaded, name)

    def _load_rows(self, attr: str, start: int, end: int, loaded, name: str) -> None:
        if attr == "bias" and self.bias is not None:
            copy_weight(self.bias[start:end], loaded, name)
        elif attr == "weight":
            store(self.fmt, self._tensors(""), (slice(start, end),), loaded, self.group_size, name)
        else:
            raise WeightError(f"checkpoint tensor {name} has no place in a {self.fmt} linear layer")

    def prepare(self) -> None:
        self._prepare("", self.kernel)
        self._weight_tensors = None

    def export(self, shard: str | None = None):
        """The weight (or one merged shard of it) as a formats value."""
        if not self.canonical:
            raise RuntimeError("a weight re-laid out for a kernel cannot be exported; load with prepare=False")
        index = 0 if shard is None else self.shard_names.index(shard)
        rows = slice(self._offsets[index], self._offsets[index + 1])
        return export(self.fmt, self._tensors(""), (rows,), self.group_size)

    # ---- compute ---------------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T, without the bias."""
        if self._weight_tensors is None:
            self._weight_tensors = {k: v.data for k, v in self._tensors("").items()}
        y = self.kernel(x.reshape(-1, self.in_features), self._weight_tensors, self.group_size)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else self.ops.add(y, self.bias)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(y, self.out_sizes, dim=-1))

    def extra_repr(self) -> str:
        group = f", group={self.group_size}" if self.fmt == "int4" else ""
        return f"{self.fmt}{group}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class QuantizedStackedExperts(_QuantizedModule):
    """StackedExperts with each expert's gate_up [2 * inter, hidden] and down [hidden, inter] in `fmt`."""

    ops: Ops = REFERENCE  # the backend's, once the model is built

    def __init__(
        self, fmt: str, num_experts: int, hidden_size: int, intermediate_size: int, kernel, group_size: int = 0,
        dtype: torch.dtype | None = None, device=None,
    ) -> None:
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        self.fmt, self.group_size, self.kernel = fmt, group_size, kernel
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.canonical = True
        lead = (num_experts,)
        self._register("gate_up_", allocate(fmt, lead, 2 * intermediate_size, hidden_size, group_size, dtype, device))
        self._register("down_", allocate(fmt, lead, hidden_size, intermediate_size, group_size, dtype, device))
        self._cached = None
        self._one_call = None  # the backend's lone-token call (Ops.token_experts), made at the first lone token (False: none)

    def checkpoint_names(self, module_name: str, attr: str) -> list[str]:
        if attr == "gate_up_qweight":
            shards = ("gate_proj", "up_proj")
        elif attr == "down_qweight":
            shards = ("down_proj",)
        else:
            return []
        return [f"{module_name}.{e}.{s}.weight" for e in range(self.num_experts) for s in shards]

    def _where(self, index: int, shard: str) -> tuple[str, tuple]:
        inter = self.intermediate_size
        if shard == "gate_proj":
            return "gate_up_", (index, slice(0, inter))
        if shard == "up_proj":
            return "gate_up_", (index, slice(inter, 2 * inter))
        return "down_", (index, slice(None))

    def load_expert(self, index: int, shard: str, loaded, name: str) -> None:
        if not 0 <= index < self.num_experts:
            raise WeightError(
                f"checkpoint tensor {name} names expert {index}, but config.json declares only {self.num_experts}"
            )
        prefix, where = self._where(index, shard)
        store(self.fmt, self._tensors(prefix), where, loaded, self.group_size, name)

    def prepare(self) -> None:
        for prefix in ("gate_up_", "down_"):
            self._prepare(prefix, self.kernel, experts=self.num_experts)
        self._cached = self._one_call = None

    def export(self, index: int, shard: str):
        if not self.canonical:
            raise RuntimeError("a weight re-laid out for a kernel cannot be exported; load with prepare=False")
        prefix, where = self._where(index, shard)
        return export(self.fmt, self._tensors(prefix), where, self.group_size)

    def expert_weights(self) -> list[tuple[dict, dict]]:
        """Each expert's (gate_up, down) kernel tensors."""
        if self._cached is None:
            self._cached = [
                ({k: v.data[e] for k, v in self._tensors("gate_up_").items()},
                 {k: v.data[e] for k, v in self._tensors("down_").items()})
                for e in range(self.num_experts)
            ]
        return self._cached

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        self.expert_weights()
        return weighted_expert_sum(x, weights, expert_ids, self.num_experts, self._expert, self.token_experts)

    def token_experts(self, dtype: torch.dtype):
        """These experts for a lone token in one backend call (made once), or None where it has none."""
        if self._one_call is None:
            self._one_call = self.ops.token_experts(
                self.fmt, self.kernel.name, self.expert_weights(), self.group_size, dtype
            ) or False
        return self._one_call or None

    def _expert(self, rows: torch.Tensor, expert: int) -> torch.Tensor:
        gate_up, down = self._cached[expert]
        return self.kernel(self.ops.silu_mul(self.kernel(rows, gate_up, self.group_size)), down, self.group_size)


class QuantizedEmbedding(nn.Module):
    """A vocabulary table stored int8 per row (one scale per token); a lookup dequantizes only its rows."""

    def __init__(self, vocab_size: int, hidden_size: int, kernel, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        self.kernel, self.dtype = kernel, dtype
        self.qweight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=torch.int8, device=device),
                                    requires_grad=False)
        self.scales = nn.Parameter(torch.empty(vocab_size, dtype=dtype, device=device), requires_grad=False)

    def checkpoint_names(self, module_name: str, attr: str) -> list[str]:
        return [f"{module_name}.weight"] if attr == "qweight" else []

    def load_weight(self, attr: str, loaded, name: str) -> None:
        if attr != "weight":
            raise WeightError(f"checkpoint tensor {name} has no place in an int8 embedding")
        store("int8", {"qweight": self.qweight, "scales": self.scales}, (slice(None),), loaded, 0, name)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(token_ids, self.qweight)
        return rows.to(self.dtype) * self.scales[token_ids, None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ table^T: the tied output head."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        y = self.kernel(flat, {"qweight": self.qweight.data, "scales": self.scales.data})
        return y.view(*hidden.shape[:-1], -1)


class TiedQuantizedHead(nn.Module):
    """The output head of a model with tied embeddings: reads the int8 embedding table."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        self.tied_to = [embedding]  # a list, so the embedding is not registered twice

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tied_to[0].logits(hidden)
