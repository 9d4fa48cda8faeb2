"""Mixture-of-experts layers split across the ranks of a stage.

TensorParallelMoE (tp > 1, ep = 1): every rank holds every routed expert, cut along the expert's
intermediate dimension, and its share of the shared experts; the routed and shared partial sums are
added and reduced once.

ExpertParallelMoE (ep > 1): each rank holds whole experts — a contiguous range, sized by the expert
split (even, --ep-weights, or measured speed). The stage's tokens are replicated after attention, so
each rank routes only its own slice of them, sends each (token, expert) pair's hidden state to the
rank holding the expert with one all_to_all, receives the outputs back with a second, weights and
sums them, adds the (replicated) shared experts and all-gathers the slices. Split sizes come from one
small all_gather of per-expert token counts, which also gives every rank the global per-expert load.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from shoal.layers.moe import MoE, StackedExperts, tokens_by_expert
from shoal.parallel.layers import COLLECTIVE_BYTES, all_gather_cat, all_reduce, dense, shard_value

# Checkpoint shards behind each stacked parameter (plain and quantized experts).
_EXPERT_SHARDS = {"gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",),
                  "gate_up_qweight": ("gate_proj", "up_proj"), "down_qweight": ("down_proj",)}


class TensorParallelExperts(StackedExperts):
    """Every expert's [rank]-th slice of the intermediate dimension."""

    def __init__(self, num_experts: int, hidden_size: int, full_intermediate: int, rank: int, size: int) -> None:
        super().__init__(num_experts, hidden_size, full_intermediate // size)
        self.rank, self.size = rank, size

    def load_expert(self, index: int, shard: str, loaded, name: str) -> None:
        inter = self.intermediate_size
        start, end = self.rank * inter, (self.rank + 1) * inter
        dim = 1 if shard == "down_proj" else 0
        super().load_expert(index, shard, shard_value(dense(loaded), dim, start, end, name), name)


class ExpertRange:
    """Mixin for stacked experts that hold experts [first, first + num_experts) of a layer of
    `total_experts`: the checkpoint names it needs, and global expert indices mapped to local ones."""

    first: int
    total_experts: int
    num_experts: int

    def checkpoint_names(self, module_name: str, attr: str) -> list[str]:
        shards = _EXPERT_SHARDS.get(attr, ())
        return [f"{module_name}.{e}.{s}.weight" for e in range(self.first, self.first + self.num_experts)
                for s in shards]

    def load_expert(self, index: int, shard: str, loaded, name: str) -> None:
        local = index - self.first
        if 0 <= local < self.num_experts:
            super().load_expert(local, shard, loaded, name)
        elif not 0 <= index < self.total_experts:
            super().load_expert(index, shard, loaded, name)  # raises the out-of-range error


class PartitionedExperts(ExpertRange, StackedExperts):
    """Experts [first, first + count) of the layer; checkpoint tensors of other experts are skipped."""

    def __init__(self, total_experts: int, first: int, count: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__(count, hidden_size, intermediate_size)
        self.total_experts, self.first = total_experts, first

    def run(self, rows: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """Each row through its (local) expert, unweighted."""
        out = torch.empty_like(rows)
        for expert, index, _ in tokens_by_expert(torch.ones(len(rows)), local_expert[:, None], self.num_experts):
            gate, up = nn.functional.linear(rows[index], self.gate_up[expert]).chunk(2, dim=-1)
            out[index] = nn.functional.linear(nn.functional.silu(gate) * up, self.down[expert]).to(rows.dtype)
        return out


def _copy_into(new: nn.Module, old: MoE) -> None:
    new.gate, new.shared_expert_gate = old.gate, old.shared_expert_gate
    new.register_buffer("expert_load", old.expert_load, persistent=False)


class TensorParallelMoE(MoE):
    def __init__(self, old: MoE, experts: TensorParallelExperts, shared: nn.Module | None, group) -> None:
        nn.Module.__init__(self)
        _copy_into(self, old)
        self.experts, self.shared_experts, self.group = experts, shared, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Routed and shared experts both leave partial sums (their down projections are not reduced):
        # MoE.forward adds them, and one reduction serves both.
        return all_reduce(super().forward(x), self.group)


class ExpertParallelMoE(MoE):
    def __init__(self, old: MoE, experts: PartitionedExperts, expert_sizes: list[int], rank: int, group) -> None:
        nn.Module.__init__(self)
        _copy_into(self, old)
        self.experts, self.shared_experts = experts, old.shared_experts  # shared experts: replicated
        self.rank, self.size, self.group = rank, len(expert_sizes), group
        bounds = [0]
        for n in expert_sizes:
            bounds.append(bounds[-1] + n)
        self.bounds = bounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        tokens, size, rank = flat.shape[0], self.size, self.rank
        per = -(-tokens // size)
        mine = flat[rank * per : (rank + 1) * per]
        weights, expert_ids = self.gate(mine)
        top_k = expert_ids.shape[1] if expert_ids.dim() == 2 else 1
        counts = torch.bincount(expert_ids.flatten(), minlength=self.expert_load.numel())
        all_counts = all_gather_cat(counts[None], self.group, size, dim=0)  # [ranks, experts]
        self.expert_load += all_counts.sum(0)
        b = self.bounds
        send_splits = [int(counts[b[r] : b[r + 1]].sum()) for r in range(size)]
        mine_counts = all_counts[:, b[rank] : b[rank + 1]]  # [source rank, my experts]
        recv_splits = mine_counts.sum(1).tolist()
        order = expert_ids.flatten().argsort(stable=True)  # pairs grouped by expert, so by owner rank
        token_of = order // top_k
        weight_of = weights.flatten()[order]
        send = mine[token_of].contiguous()
        received = send.new_empty(sum(recv_splits), flat.shape[1])
        dist.all_to_all_single(received, send, recv_splits, send_splits, group=self.group)
        local_expert = torch.repeat_interleave(
            torch.arange(mine_counts.shape[1], device=flat.device).repeat(size), mine_counts.flatten()
        )
        outputs = self.experts.run(received, local_expert)
        back = send.new_empty(send.shape)
        dist.all_to_all_single(back, outputs, send_splits, recv_splits, group=self.group)
        COLLECTIVE_BYTES["all_to_all"] += (send.numel() + outputs.numel()) * send.element_size()
        out = torch.zeros_like(mine)
        out.index_add_(0, token_of, (back * weight_of[:, None]).to(mine.dtype))
        shared = self.shared(mine)
        if shared is not None:
            out = out + shared
        padded = out.new_zeros(per, flat.shape[1])
        padded[: out.shape[0]] = out
        return all_gather_cat(padded, self.group, size, dim=0)[:tokens].view(shape)
