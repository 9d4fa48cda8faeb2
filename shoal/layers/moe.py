"""Mixture of experts: a router picks top-k routed experts per token; always-on shared experts are added.

One layer for every MoE family; routing follows each one's own code:
  DeepSeek-V2  softmax scores, top-k greedy or group-limited greedy (best expert per group picks the groups);
  DeepSeek-V3  sigmoid scores plus a load-balancing bias used only for choosing (`e_score_correction_bias`),
               groups ranked by the sum of their two best experts (`noaux_tc`);
  Qwen2/3-MoE  softmax, top-k, renormalised where norm_topk_prob; Qwen2-MoE's one shared expert is
               scaled by a sigmoid gate;
  Mixtral      softmax, top-2, always renormalised (norm_topk_prob).
Routed experts are stored stacked ([experts, out, in]) so tokens can be grouped by expert and each
expert's weights read once per step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from shoal.backends.ops import REFERENCE, Ops
from shoal.errors import WeightError
from shoal.layers.linear import Linear, copy_weight
from shoal.layers.mlp import GatedMLP


@dataclass(frozen=True)
class RouterConfig:
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" (V2) or "sigmoid" (V3)
    topk_method: str = "greedy"  # "greedy", "group_limited_greedy" (V2) or "noaux_tc" (V3)
    num_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False


class Router(nn.Module):
    ops: Ops = REFERENCE  # the backend's, once the model is built

    def __init__(self, hidden_size: int, cfg: RouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Routing runs in float32 whatever the model dtype: a flipped expert choice changes the output a lot.
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        if cfg.correction_bias:
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(cfg.num_experts, dtype=torch.float32), requires_grad=False
            )

    def forward(self, x: torch.Tensor, load: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> (weights [tokens, top_k] float32, expert ids [tokens, top_k]); each choice is
        counted into load [experts] when given."""
        cfg = self.cfg
        # A backend's one call (the CPU's C router) may stand in for the operators of _route, for any number
        # of tokens, so that a token is routed the same alone and in a batch.
        grouped = cfg.topk_method in ("group_limited_greedy", "noaux_tc") and cfg.num_groups > 1
        scaling = cfg.routed_scaling_factor
        if cfg.scoring != "sigmoid" and cfg.norm_topk_prob and cfg.top_k > 1:
            scaling = 1.0  # V2 normalises instead of scaling
        routed = self.ops.moe_route(
            x, self.weight, cfg.top_k, cfg.scoring == "sigmoid",
            self.e_score_correction_bias if cfg.correction_bias else None, cfg.norm_topk_prob, scaling, load,
            cfg.num_groups, cfg.topk_groups, cfg.topk_method if grouped else None,
        )
        if routed is not None:
            return routed
        weights, expert_ids = self._route(x)
        if load is not None:
            if x.shape[0] == 1:
                load.index_add_(0, expert_ids[0], torch.ones_like(expert_ids[0]))  # distinct experts
            else:
                load += torch.bincount(expert_ids.flatten(), minlength=load.numel())
        return weights, expert_ids

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = nn.functional.linear(x.float(), self.weight)
        if cfg.scoring == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if cfg.correction_bias else scores
        if cfg.topk_method in ("group_limited_greedy", "noaux_tc") and cfg.num_groups > 1:
            grouped = choice.view(-1, cfg.num_groups, cfg.num_experts // cfg.num_groups)
            if cfg.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.max(dim=-1).values
            top_groups = group_scores.topk(cfg.topk_groups, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            keep = keep[:, :, None].expand_as(grouped).reshape(-1, cfg.num_experts)
            fill = float("-inf") if cfg.topk_method == "noaux_tc" else 0.0
            choice = choice.masked_fill(~keep, fill)
        expert_ids = choice.topk(cfg.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, expert_ids)
        if cfg.scoring == "sigmoid":
            if cfg.norm_topk_prob and cfg.top_k > 1:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            weights = weights * cfg.routed_scaling_factor
        elif cfg.norm_topk_prob and cfg.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        elif cfg.routed_scaling_factor != 1.0:
            weights = weights * cfg.routed_scaling_factor
        return weights, expert_ids


class StackedExperts(nn.Module):
    """All routed experts of one layer: gate_up [experts, 2 * inter, hidden], down [experts, hidden, inter]."""

    ops: Ops = REFERENCE  # the backend's, once the model is built
    prepared = None  # per expert, (gate_up, down) re-laid for the backend's matmul (Ops.prepare_weights), or None

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
        self._one_call = None  # the backend's lone-token call (Ops.token_experts), made at the first lone token (False: none)

    def checkpoint_names(self, module_name: str, attr: str) -> list[str]:
        shards = ("gate_proj", "up_proj") if attr == "gate_up" else ("down_proj",)
        return [f"{module_name}.{e}.{s}.weight" for e in range(self.num_experts) for s in shards]

    def load_expert(self, index: int, shard: str, loaded: torch.Tensor, name: str) -> None:
        if not 0 <= index < self.num_experts:
            raise WeightError(
                f"checkpoint tensor {name} names expert {index}, but config.json declares only {self.num_experts}"
            )
        inter = self.intermediate_size
        if shard == "gate_proj":
            copy_weight(self.gate_up[index, :inter], loaded, name)
        elif shard == "up_proj":
            copy_weight(self.gate_up[index, inter:], loaded, name)
        else:
            copy_weight(self.down[index], loaded, name)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden]; each token's output is the routing-weighted sum of its experts' outputs."""
        return weighted_expert_sum(x, weights, expert_ids, self.num_experts, self._expert, self.token_experts)

    def _expert(self, rows: torch.Tensor, expert: int) -> torch.Tensor:
        gate_up, down = self.prepared[expert] if self.prepared is not None else (None, None)
        h = self.ops.silu_mul(self.ops.linear(rows, self.gate_up[expert], None, gate_up))
        return self.ops.linear(h, self.down[expert], None, down)

    def token_experts(self, dtype: torch.dtype):
        """These experts for a lone token in one backend call (made once), or None where it has none."""
        if self._one_call is None:
            prepared = self.prepared or [(None, None)] * self.num_experts
            experts = [({"weight": self.gate_up.data[e], "prepared": prepared[e][0]},
                        {"weight": self.down.data[e], "prepared": prepared[e][1]}) for e in range(self.num_experts)]
            self._one_call = self.ops.token_experts(None, None, experts, 0, dtype) or False
        return self._one_call or None


def weighted_expert_sum(
    x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, expert_fn, one_call=None
) -> torch.Tensor:
    """Each token's routing-weighted sum of its experts' outputs, for x [tokens, hidden]: the experts'
    tokens grouped so each expert runs once on all of its rows, or a lone token's experts run straight
    on its row. expert_fn(rows, expert) -> the expert's unweighted output; shared by the dense and the
    quantized stacked experts. one_call(dtype) -> the backend's call (Ops.token_experts: the step's
    experts with the same sums as `one_token` / the grouped loop below) or None."""
    # The backend's call (Ops.token_experts) takes a step's tokens in one go where it can — token by
    # token while their choices do not outnumber the experts, grouped by expert beyond — with this
    # function's bits, so a recorded decode step replays the experts at any batch size.
    fused = one_call(x.dtype) if one_call is not None and x.device.type == "cpu" else None
    out = fused(x, weights, expert_ids) if fused is not None else None
    if out is not None:
        return out
    if x.shape[0] == 1:
        return one_token(x, weights, expert_ids, expert_fn)
    out = torch.zeros_like(x)
    for expert, tokens, token_weights in tokens_by_expert(weights, expert_ids, num_experts):
        y = expert_fn(x[tokens], expert)
        out.index_add_(0, tokens, (y * token_weights[:, None]).to(x.dtype))
    return out


def one_token(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, expert_fn) -> torch.Tensor:
    """The experts' weighted sum for a lone token x [1, hidden] (batch-1 decode): each chosen expert runs
    straight on the row, without the grouping and scatter the batched path needs. Experts are added in
    the batched path's order (by expert index), each weighted output rounded to x's dtype, so the sums
    are the same. expert_fn(rows, expert) -> the expert's unweighted output."""
    out = None
    for expert, weight in sorted(zip(expert_ids[0].tolist(), weights[0].tolist())):
        y = (expert_fn(x, expert) * weight).to(x.dtype)
        out = y if out is None else out.add_(y)
    return out if out is not None else torch.zeros_like(x)


def tokens_by_expert(weights: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """Group a batch's (token, slot) routing choices by expert: yields (expert, token indices, routing
    weights) for each expert that received tokens, so each expert runs one matmul over all of its tokens."""
    flat_experts = expert_ids.flatten()
    order = flat_experts.argsort(stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
    token_of = order // expert_ids.shape[1]
    weight_of = weights.flatten()[order]
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, token_of[start : start + count], weight_of[start : start + count]
            start += count


class SharedExpertGate(Linear):
    """Qwen2-MoE's shared-expert gate: one output per token, so a GGUF file (llama.cpp's
    ffn_gate_inp_shexp) may hold its weight as a vector [hidden] rather than a matrix [1, hidden]."""

    def load_weight(self, attr: str, loaded: torch.Tensor, name: str) -> None:
        if attr == "weight" and isinstance(loaded, torch.Tensor) and loaded.dim() == 1:
            loaded = loaded[None]
        copy_weight(getattr(self, attr), loaded, name)


class MoE(nn.Module):
    """Routed experts plus, where the family has them, always-on shared experts: DeepSeek's added as
    they are, Qwen2-MoE's one shared expert scaled per token by sigmoid(shared_expert_gate(x))."""

    ops: Ops = REFERENCE  # the backend's, once the model is built

    def __init__(
        self, hidden_size: int, moe_intermediate_size: int, router: RouterConfig, shared_intermediate_size: int = 0,
        shared_gate: bool = False,
    ) -> None:
        super().__init__()
        self.gate = Router(hidden_size, router)
        self.experts = StackedExperts(router.num_experts, hidden_size, moe_intermediate_size)
        self.shared_experts = GatedMLP(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        # One output: a per-token scalar, so it scales a tensor-parallel rank's partial sum as it does the whole.
        self.shared_expert_gate = (
            SharedExpertGate(hidden_size, 1) if shared_gate and self.shared_experts is not None else None
        )
        # Tokens routed to each expert since start (the /metrics and benchmark per-expert load).
        self.register_buffer("expert_load", torch.zeros(router.num_experts, dtype=torch.long), persistent=False)

    def materialize_buffers(self, device: torch.device) -> None:
        """A zero count on `device` (the module may have been built on the meta device)."""
        self.expert_load = torch.zeros(self.expert_load.shape, dtype=torch.long, device=device)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's (weights, expert ids) for flat [tokens, hidden], counted in `expert_load`."""
        return self.gate(flat, self.expert_load)

    def shared(self, flat: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' output for flat [tokens, hidden] (gated where the family gates it), or None."""
        if self.shared_experts is None:
            return None
        out = self.shared_experts(flat)
        if self.shared_expert_gate is not None:
            out = self.ops.sigmoid_gate(out, self.shared_expert_gate(flat))
        return out

    def mix(self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for flat [tokens, hidden], plus the shared experts' output."""
        out = self.experts(flat, weights, expert_ids)
        shared = self.shared(flat)
        return self.ops.add(out, shared) if shared is not None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return self.mix(flat, *self.route(flat)).view(x.shape)


# Per-expert checkpoint names, after the family's renames (CausalLM.checkpoint_renames).
EXPERT_NAME = re.compile(r"^((?:model\.layers\.\d+|mtp)\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def routed_expert_weight(name: str) -> tuple[str, int, str] | None:
    """model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight -> (module name, E, shard), else None."""
    match = EXPERT_NAME.match(name)
    return None if match is None else (match.group(1), int(match.group(2)), match.group(3))
