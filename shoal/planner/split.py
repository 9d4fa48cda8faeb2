"""One model split over chips of unequal speed (`--mode split`), weighted by speed as shoal's engine
weighs them (parallel/executor.py measures each rank's memory bandwidth, parallel/split.py's
proportional_split divides by it):

- layers: pipeline stages of equal size on different chip kinds, each stage given layers in proportion
  to its chips' memory bandwidth (`--pp-layers auto`), timed stage by stage by the cost model. A decode
  step runs as many micro-batches as stages: a sequence's next token comes after every stage has run
  its micro-batch (the sum of the stage times) or, when the pipeline is full, after the slowest stage
  has run all of them, whichever is longer. Activations cross between servers over the slower of the
  two kinds' scale-out links.
- experts (MoE models): one stage whose tensor- and expert-parallel group spans chips of several kinds,
  attention split evenly and each chip holding routed experts in proportion to its memory bandwidth
  (`--ep-weights auto`). The chips run in lockstep (every layer ends in a collective), so a step takes
  as long as its slowest chip; the group's collectives cross the network between the kinds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shoal.parallel.split import proportional_split
from shoal.planner.catalog import Chip
from shoal.planner.cost import Deployment, Layout, check_layout, decode_step_time, memory_per_chip, prefill_time
from shoal.planner.errors import PlanError
from shoal.planner.search import Plan, Workload, _most_sequences
from shoal.planner.shapes import ModelShape


@dataclass
class Stage:
    """Chips of one kind in the instance: a pipeline stage (`layers` of the model), or with `experts`
    their part of a stage split by experts (every layer, `experts` routed experts on each chip)."""

    chip: Chip
    layers: int
    tp: int
    experts: int | None = None

    def describe(self) -> str:
        if self.experts is not None:
            return f"{self.tp} x {self.chip.key} ({self.experts} experts each)"
        return f"{self.tp} x {self.chip.key} ({self.layers} layers)"


@dataclass
class SplitPlan(Plan):
    """A plan whose instance spans several chip kinds: `stages` in pipeline order."""

    stages: tuple[Stage, ...] = ()

    @property
    def kinds(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for stage in self.stages:
            used[stage.chip.key] = used.get(stage.chip.key, 0) + stage.tp
        return used

    @property
    def watts(self) -> float:
        return sum(s.tp * s.chip.energy_power_w for s in self.stages)

    @property
    def usd_per_mtok(self) -> float | None:
        if any(not s.chip.price_per_hour for s in self.stages):
            return None
        return sum(s.tp * s.chip.price_per_hour for s in self.stages) / (self.output_tps * 3600) * 1e6

    def describe(self) -> str:
        if any(s.experts is not None for s in self.stages):
            return f"experts split {' + '.join(s.describe() for s in self.stages)} {self.quant}"
        return f"split {' | '.join(s.describe() for s in self.stages)} {self.quant}"

    def as_dict(self) -> dict:
        out = super().as_dict()
        out.update(chip=None, layout=self.describe(), chips_by_kind=self.kinds,
                   stages=[{"chip": s.chip.key, "tp": s.tp, "layers": s.layers,
                            **({"experts": s.experts} if s.experts is not None else {})} for s in self.stages])
        return out


def stage_shape(shape: ModelShape, layers: int, first: int) -> ModelShape:
    """The part of the model a stage holds: `layers` decoder layers starting at layer `first` (dense
    layers come first, as in DeepSeek's first_k_dense_replace)."""
    dense = max(0, min(shape.dense_layers - first, layers))
    return dataclasses.replace(shape, layers=layers, dense_layers=dense, moe_layers=layers - dense,
                               mtp_layers=0)


def split_layers(shape: ModelShape, kinds: list[Chip]) -> list[int]:
    """Layers per stage, in proportion to each stage's memory bandwidth per chip (the engine's rule:
    a decode step reads every weight once, so bandwidth is the speed that matters)."""
    if len(kinds) > shape.layers:
        raise PlanError(f"{len(kinds)} stages need at least one layer each, but the model has {shape.layers}")
    return proportional_split(shape.layers, [c.memory_bw_gbps for c in kinds])


def evaluate_split(shape: ModelShape, kinds: list[Chip], tp: int, quant: str, work: Workload, factors_of) -> \
        SplitPlan | None:
    """The best colocated plan for one instance whose pipeline stages are `kinds` (one chip kind per
    stage, `tp` chips each), at the largest batch that meets the limits; None when none does."""
    layers = split_layers(shape, kinds)
    parts, first = [], 0
    for chip, count in zip(kinds, layers):
        part = stage_shape(shape, count, first)
        first += count
        dep = Deployment(chip, Layout(tp, tp=tp), quant=quant, kv_dtype=work.kv_dtype)
        try:
            check_layout(part, dep.layout)
        except PlanError:
            return None
        parts.append((part, dep, factors_of(chip)))
    stages = tuple(Stage(chip, count, tp) for chip, count in zip(kinds, layers))
    return _best_plan(shape, parts, kinds, work, quant, stages, pipelined=True)


def expert_shares(shape: ModelShape, counts: list[tuple[Chip, int]]) -> list[int]:
    """Routed experts per chip of each kind when one stage's chips split them by memory bandwidth, as the
    engine's --ep-weights auto does (proportional_split over the ranks; a kind's chips get equal parts
    up to rounding, and each kind is given the smallest part any of its chips holds)."""
    ranks = [chip for chip, n in counts for _ in range(n)]
    parts = proportional_split(shape.routed_experts, [c.memory_bw_gbps for c in ranks])
    shares, start = [], 0
    for _, n in counts:
        shares.append(max(parts[start:start + n]))  # the busiest chip of the kind sets its time
        start += n
    return shares


def evaluate_expert_split(shape: ModelShape, counts: list[tuple[Chip, int]], quant: str, work: Workload,
                          factors_of) -> SplitPlan | None:
    """The best colocated plan for one stage of sum(counts) chips of several kinds in one tensor- and
    expert-parallel group (ep = tp, as the engine runs it): attention split evenly, routed experts by
    memory bandwidth (expert_shares); None when the layout does not divide the model or no batch meets
    the limits."""
    if not shape.routed_experts or len(counts) < 2:
        return None
    tp = sum(n for _, n in counts)
    if tp > shape.routed_experts:
        return None
    try:
        check_layout(shape, Layout(tp, tp=tp))
    except PlanError:
        return None
    shares = expert_shares(shape, counts)
    slowest_link = min(chip.scaleout_gbps for chip, _ in counts)
    parts = []
    for (chip, n), experts in zip(counts, shares):
        # the group's collectives stay on a kind's own fabric among its n chips, cross the network otherwise
        seen = dataclasses.replace(chip, scaleup_domain=max(1, min(chip.scaleup_domain, n)),
                                   scaleout_gbps=slowest_link)
        dep = Deployment(seen, Layout(tp, tp=tp, ep=tp), quant=quant, kv_dtype=work.kv_dtype,
                         expert_share=experts * tp / shape.routed_experts)
        parts.append((shape, dep, factors_of(chip)))
    stages = tuple(Stage(chip, shape.layers, n, experts) for (chip, n), experts in zip(counts, shares))
    return _best_plan(shape, parts, [chip for chip, _ in counts], work, quant, stages, pipelined=False)


def _best_plan(shape: ModelShape, parts: list, kinds: list[Chip], work: Workload, quant: str,
               stages: tuple[Stage, ...], pipelined: bool) -> SplitPlan | None:
    """The largest batch that meets the limits for `parts` ((shape, deployment, factors) per stage or
    per kind): pipeline stages in turn (`pipelined`), or chips in lockstep, a step as long as the slowest."""
    total = work.input_len + work.output_len
    top = min(_max_seqs(part, dep, total) for part, dep, _ in parts)
    if top < 1:
        return None
    pp = len(parts) if pipelined else 1
    link = min(c.scaleout_gbps for c in kinds) * 1e9 * min(f.link for _, _, f in parts)
    context = work.decode_context

    def send_s(tokens: float) -> float:  # activations from one stage to the next
        return tokens * shape.hidden * 2.0 / link if pp > 1 else 0.0

    def timing(seqs: int) -> tuple[float, float]:
        """(seconds between two tokens of a sequence, TPOT) with `seqs` decoding; each step also
        prefills the prompts of the sequences that replace finished ones."""
        new_prompts = seqs / work.output_len
        per_mb = []
        for part, dep, factors in parts:
            step = decode_step_time(part, dep, factors, max(1, round(seqs / pp)), context)[0]
            chunk = prefill_time(part, dep, factors, 1, work.input_len)[0] * new_prompts / pp
            per_mb.append(step + chunk + send_s(seqs / pp))
        cycle = max(sum(per_mb), pp * max(per_mb)) if pipelined else max(per_mb)
        return cycle, cycle

    prefills = [prefill_time(part, dep, factors, 1, work.input_len)[0] + send_s(work.input_len)
                for part, dep, factors in parts]
    ttft_one = sum(prefills) if pipelined else max(prefills)
    found = _most_sequences(timing, ttft_one, work, top)
    if found is None:
        return None
    seqs, cycle, tpot = found
    memory = max(memory_per_chip(part, dep, seqs, total, seqs).total for part, dep, _ in parts) / 1e9
    chips = sum(s.tp for s in stages)
    layout = Layout(chips, tp=stages[0].tp, pp=pp) if pipelined else Layout(chips, tp=chips, ep=chips)
    return SplitPlan(kinds[0], quant, "split", layout, None, seqs, float(chips), ttft_one + cycle,
                     tpot, seqs / cycle, memory_gb=memory, stages=stages)


def _max_seqs(part: ModelShape, dep: Deployment, context: int) -> int:
    base = memory_per_chip(part, dep, 0, context, 0)
    free = base.capacity - base.weights
    if free <= 0:
        return 0
    per_seq = memory_per_chip(part, dep, 1, context, 1).total - base.total
    return int(free / per_seq) if per_seq > 0 else 1 << 20


def search_split(shape: ModelShape, fleet: dict[str, int], chips: dict[str, Chip], work: Workload, factors_of,
                 quants: list[str], max_stages: int = 4) -> list[SplitPlan]:
    """Split plans over the kinds of a fleet ({key: count}): by layers, every stage size tp (a power of two
    within both kinds' scale-up domains, dividing their counts) and every number of stages of each kind
    the fleet holds, up to `max_stages` in all, the kind with the faster memory first in the pipeline;
    by experts (MoE models), one stage of a power of two chips of each kind, up to a scale-up domain each."""
    keys = sorted(fleet, key=lambda k: -chips[k].memory_bw_gbps)
    if len(keys) < 2:
        return []
    plans = list(_expert_splits(shape, fleet, chips, keys, work, factors_of, quants))
    tp = 1
    while all(tp <= chips[k].scaleup_domain for k in keys):
        if all(fleet[k] % tp == 0 for k in keys):
            counts = [range(0, fleet[k] // tp + 1) for k in keys]
            for combo in _product(counts):
                if sum(1 for n in combo if n) < 2 or sum(combo) > min(max_stages, shape.layers):
                    continue
                kinds = [chips[k] for k, n in zip(keys, combo) for _ in range(n)]
                for quant in quants:
                    if not all(q_ok(c, quant) for c in kinds):
                        continue
                    plan = evaluate_split(shape, kinds, tp, quant, work, factors_of)
                    if plan is not None:
                        plans.append(plan)
        tp *= 2
    return plans


def _expert_splits(shape: ModelShape, fleet: dict[str, int], chips: dict[str, Chip], keys: list[str],
                   work: Workload, factors_of, quants: list[str]):
    if not shape.routed_experts:
        return
    sizes = [[n for n in (1, 2, 4, 8, 16, 32, 64) if n <= min(fleet[k], chips[k].scaleup_domain)] for k in keys]
    for combo in _product(sizes):
        counts = [(chips[k], n) for k, n in zip(keys, combo)]
        for quant in quants:
            if all(q_ok(chip, quant) for chip, _ in counts):
                plan = evaluate_expert_split(shape, counts, quant, work, factors_of)
                if plan is not None:
                    yield plan


def q_ok(chip: Chip, quant: str) -> bool:
    return quant in ("bf16", "int4") or chip.has_compute(quant)


def _product(ranges):
    if not ranges:
        yield ()
        return
    for head in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (head, *rest)
