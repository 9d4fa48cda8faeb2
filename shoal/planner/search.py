"""Search over chip kinds, chip counts, layouts, quantization and batch size under TTFT / TPOT limits.

Each candidate is one serving instance evaluated by the cost model at the largest batch that meets
the limits: colocated (the same chips prefill and decode, prefill chunks interleaved with decode
steps) or disaggregated (a decode instance plus the share of prefill chips that keeps it fed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from shoal.planner.catalog import Chip
from shoal.planner.cost import Deployment, Factors, Layout, check_layout, decode_step_time, max_decode_seqs, \
    memory_per_chip, prefill_time
from shoal.planner.errors import PlanError
from shoal.planner.shapes import ModelShape

QUANTS = ("bf16", "fp8", "int8", "int4")


@dataclass
class Workload:
    input_len: int
    output_len: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    mtp_tokens: int = 0
    mtp_acceptance: float = 0.0
    expert_imbalance: float = 1.0
    kv_dtype: str = "bf16"

    @property
    def decode_context(self) -> float:
        return self.input_len + self.output_len / 2


@dataclass
class Plan:
    """One evaluated deployment: `chips` is decode plus prefill chips (fractional when a prefill
    instance is shared between several decode instances)."""

    chip: Chip
    quant: str
    mode: str
    layout: Layout
    prefill_layout: Layout | None
    seqs: int
    chips: float
    ttft_s: float
    tpot_s: float
    output_tps: float  # output tokens/s of the whole deployment
    prefill_chips: float = 0.0
    memory_gb: float = 0.0
    notes: dict = field(default_factory=dict)
    prefill_chip: Chip | None = None  # mode "mixed": the prefill instances' chip kind (another than `chip`)

    @property
    def tps_per_chip(self) -> float:
        return self.output_tps / self.chips

    @property
    def prefill_kind(self) -> Chip:
        return self.prefill_chip or self.chip

    @property
    def watts(self) -> float:
        return (self.chips - self.prefill_chips) * self.chip.energy_power_w \
            + self.prefill_chips * self.prefill_kind.energy_power_w

    @property
    def tokens_per_joule(self) -> float:
        return self.output_tps / self.watts

    @property
    def kwh_per_mtok(self) -> float:
        return self.watts / self.output_tps * 1e6 / 3.6e6

    @property
    def usd_per_mtok(self) -> float | None:
        if not self.chip.price_per_hour or not self.prefill_kind.price_per_hour:
            return None
        per_hour = ((self.chips - self.prefill_chips) * self.chip.price_per_hour
                    + self.prefill_chips * self.prefill_kind.price_per_hour)
        return per_hour / (self.output_tps * 3600) * 1e6

    def describe(self) -> str:
        text = f"{self.layout.describe()} {self.quant} {self.mode}"
        if self.prefill_layout is not None:
            kind = f" of {self.prefill_chip.key}" if self.prefill_chip else ""
            text += f" (+{self.prefill_chips:.2f} prefill chips{kind}, {self.prefill_layout.describe()})"
        return text

    def as_dict(self) -> dict:
        return {
            "chip": self.chip.key, "quant": self.quant, "mode": self.mode, "layout": self.layout.describe(),
            "prefill_layout": self.prefill_layout.describe() if self.prefill_layout else None,
            "prefill_chip": self.prefill_kind.key if self.prefill_layout else None,
            "chips": self.chips, "prefill_chips": self.prefill_chips, "batch": self.seqs,
            "ttft_ms": self.ttft_s * 1e3, "tpot_ms": self.tpot_s * 1e3, "output_tokens_per_s": self.output_tps,
            "tokens_per_s_per_chip": self.tps_per_chip, "tokens_per_joule": self.tokens_per_joule,
            "kwh_per_million_tokens": self.kwh_per_mtok, "usd_per_million_tokens": self.usd_per_mtok,
            "memory_gb_per_chip": self.memory_gb,
        }


def candidate_layouts(shape: ModelShape, chip: Chip, max_chips: int) -> list[Layout]:
    """Powers-of-two instance sizes; tensor parallel inside the scale-up domain; experts spread over
    the stage (ep = stage chips) or not at all; pipeline stages 1, 2 or 4."""
    layouts = []
    n = 1
    while n <= max_chips:
        for pp in (1, 2, 4):
            for tp in (1, 2, 4, 8, 16, 32, 64):
                if tp * pp > n or n % (tp * pp) or tp > chip.scaleup_domain:
                    continue
                eps = [1]
                if shape.routed_experts and n // pp > 1:
                    eps = sorted({1, n // pp // tp, n // pp})
                for ep in eps:
                    layout = Layout(n, tp=tp, ep=ep, pp=pp)
                    try:
                        check_layout(shape, layout)
                    except PlanError:
                        continue
                    layouts.append(layout)
        n *= 2
    return layouts


def _tpot_decode(shape, dep, factors, seqs, context) -> float:
    return decode_step_time(shape, dep, factors, seqs, context)[0] / dep.tokens_per_step


def _largest(ok, top: int) -> int:
    """Largest n in [1, top] with ok(n) true, assuming ok is monotone (true then false); 0 if none."""
    if top < 1 or not ok(1):
        return 0
    if ok(top):
        return top
    low, high = 1, top
    while high - low > 1:
        mid = (low + high) // 2
        if ok(mid):
            low = mid
        else:
            high = mid
    return low


def _most_sequences(timing, ttft_one: float, work: Workload, top: int) -> tuple[int, float, float] | None:
    """The most concurrent sequences (up to `top`) whose step cycle and TPOT, from timing(seqs), keep
    within the workload's TPOT and TTFT limits (TTFT: one prompt's prefill `ttft_one` plus a cycle), with
    that cycle and TPOT; None if not even one fits."""

    def ok(seqs: int) -> bool:
        cycle, tpot = timing(seqs)
        return (work.tpot_s is None or tpot <= work.tpot_s) and (work.ttft_s is None or ttft_one + cycle <= work.ttft_s)

    seqs = _largest(ok, top)
    if seqs == 0:
        return None
    return (seqs, *timing(seqs))


def best_prefill(shape: ModelShape, dep: Deployment, factors: Factors, work: Workload) -> tuple[float, int, float]:
    """(input tokens/s per chip, prompts per batch, TTFT) of the largest prefill batch within the TTFT
    limit (TTFT = the batch's prefill time) and memory; (0, 0, TTFT of one prompt) when none fits."""
    def ttft(k: int) -> float:
        return prefill_time(shape, dep, factors, k, work.input_len)[0]

    def fits(k: int) -> bool:
        mem = memory_per_chip(shape, dep, k, work.input_len, k * work.input_len)
        return mem.fits and (work.ttft_s is None or ttft(k) <= work.ttft_s)

    cap = max(1, (64 * 1024 * dep.layout.chips) // work.input_len)  # at most 64K tokens per chip per batch
    k = _largest(fits, cap)
    if k == 0:
        return 0.0, 0, ttft(1)
    seconds = ttft(k)
    return k * work.input_len / seconds / dep.layout.chips, k, seconds


def evaluate(shape: ModelShape, chip: Chip, layout: Layout, quant: str, work: Workload, factors: Factors,
             mode: str, prefill: tuple[float, Layout, float] | None = None) -> Plan | None:
    """The best plan for this instance (largest batch within the limits), or None when none meets them."""
    dep = Deployment(chip, layout, quant=quant, kv_dtype=work.kv_dtype, mtp_tokens=work.mtp_tokens,
                     mtp_acceptance=work.mtp_acceptance, expert_imbalance=work.expert_imbalance)
    context = work.decode_context
    top = max_decode_seqs(shape, dep, int(work.input_len + work.output_len))
    if top < 1:
        return None
    tps = dep.tokens_per_step
    if mode == "disaggregated":
        if prefill is None or prefill[0] <= 0:
            return None
        prefill_rate, prefill_layout, ttft = prefill

        def ok(seqs: int) -> bool:  # the first token also waits for one decode step after its prefill
            step_s = decode_step_time(shape, dep, factors, seqs, context)[0]
            return ((work.tpot_s is None or step_s / tps <= work.tpot_s)
                    and (work.ttft_s is None or ttft + step_s <= work.ttft_s))

        seqs = _largest(ok, top)
        if seqs == 0:
            return None
        step = decode_step_time(shape, dep, factors, seqs, context)[0]
        output = seqs * tps / step
        prefill_chips = output * work.input_len / work.output_len / prefill_rate
        tpot = step / tps
        return Plan(chip, quant, mode, layout, prefill_layout, seqs, layout.chips + prefill_chips, ttft + step,
                    tpot, output, prefill_chips,
                    memory_per_chip(shape, dep, seqs, work.input_len + work.output_len, seqs * tps).total / 1e9)

    # colocated: each step also prefills the prompts of the sequences that replace finished ones
    def timing(seqs: int) -> tuple[float, float]:
        step = decode_step_time(shape, dep, factors, seqs, context)[0]
        new_prompts = seqs * tps / work.output_len
        chunk = prefill_time(shape, dep, factors, 1, work.input_len)[0] * new_prompts
        return step + chunk, (step + chunk) / tps

    ttft_one = prefill_time(shape, dep, factors, 1, work.input_len)[0]

    found = _most_sequences(timing, ttft_one, work, top)
    if found is None:
        return None
    seqs, cycle, tpot = found
    return Plan(chip, quant, mode, layout, None, seqs, float(layout.chips), ttft_one + cycle, tpot,
                seqs * tps / cycle, 0.0,
                memory_per_chip(shape, dep, seqs, work.input_len + work.output_len, seqs * tps).total / 1e9)


def search(shape: ModelShape, chips: list[Chip], work: Workload, factors_of, max_chips: int = 64,
           quants: list[str] | None = None, modes: tuple[str, ...] = ("colocated", "disaggregated"),
           progress: bool = False) -> list[Plan]:
    """Every feasible plan over the chip kinds; factors_of(chip) gives each chip's efficiency factors."""
    from tqdm import tqdm

    # a separate prefill instance may take 80% of the TTFT limit: the first token also waits for a decode step
    prefill_work = work if work.ttft_s is None else dataclasses.replace(work, ttft_s=0.8 * work.ttft_s)
    plans = []
    prefill_by: dict[tuple[str, str], tuple[float, Layout, float]] = {}  # (chip, quant) -> its best prefill
    for chip in chips:
        factors = factors_of(chip)
        formats = [q for q in (quants or QUANTS) if q in ("bf16", "int4") or chip.has_compute(q)]
        layouts = candidate_layouts(shape, chip, max_chips)
        for quant in tqdm(formats, desc=f"plan {chip.key}", disable=not progress, leave=False):
            prefill_best = None
            if "disaggregated" in modes or "mixed" in modes:
                for layout in layouts:
                    dep = Deployment(chip, layout, quant=quant, kv_dtype=work.kv_dtype)
                    if memory_per_chip(shape, dep, 0, 0, 0).weights > dep.chip.memory_gb * 1e9 * dep.memory_util:
                        continue
                    rate, _, ttft = best_prefill(shape, dep, factors, prefill_work)
                    if rate > 0 and (prefill_best is None or rate > prefill_best[0]):
                        prefill_best = (rate, layout, ttft)
            if prefill_best is not None:
                prefill_by[(chip.key, quant)] = prefill_best
            for layout in layouts:
                for mode in modes:
                    if mode == "mixed":
                        continue
                    plan = evaluate(shape, chip, layout, quant, work, factors, mode, prefill_best)
                    if plan is not None:
                        plans.append(plan)
    if "mixed" in modes:
        plans += _mixed(shape, chips, work, factors_of, max_chips, quants, prefill_by)
    return plans


def _mixed(shape, chips, work, factors_of, max_chips, quants, prefill_by) -> list[Plan]:
    """Decode on one chip kind, prefill on another (its best prefill instance, in the same weight
    format when it has it, else in its fastest one); the KV cache crossing between them is not timed."""
    plans = []
    for chip in chips:
        factors = factors_of(chip)
        formats = [q for q in (quants or QUANTS) if q in ("bf16", "int4") or chip.has_compute(q)]
        layouts = candidate_layouts(shape, chip, max_chips)
        for other in chips:
            if other.key == chip.key:
                continue
            own = [v for (key, _), v in prefill_by.items() if key == other.key]
            if not own:
                continue
            fastest = max(own, key=lambda v: v[0])
            for quant in formats:
                prefill = prefill_by.get((other.key, quant), fastest)
                for layout in layouts:
                    plan = evaluate(shape, chip, layout, quant, work, factors, "disaggregated", prefill)
                    if plan is not None:
                        plan.mode, plan.prefill_chip = "mixed", other
                        plans.append(plan)
    return plans


OBJECTIVES = {
    "chip": lambda p: p.tps_per_chip,
    "watt": lambda p: p.tokens_per_joule,
    "dollar": lambda p: 1 / p.usd_per_mtok if p.usd_per_mtok else 0.0,
}


def pareto_front(plans: list[Plan]) -> list[Plan]:
    """Plans no other plan beats on all of throughput per chip, per watt and per dollar."""
    scores = [tuple(fn(p) for fn in OBJECTIVES.values()) for p in plans]
    front = []
    for i, s in enumerate(scores):
        dominated = any(all(o >= v for o, v in zip(t, s)) and any(o > v for o, v in zip(t, s))
                        for j, t in enumerate(scores) if j != i)
        if not dominated:
            front.append(plans[i])
    return front


def best_by_chip_count(plans: list[Plan], chip_key: str) -> list[Plan]:
    """For one chip kind, the highest-throughput plan at each total chip count (rounded up), keeping
    only counts where throughput rises — the curve that the throughput plot draws."""
    best: dict[int, Plan] = {}
    for plan in plans:
        if plan.chip.key != chip_key or plan.prefill_chip is not None:
            continue
        count = math.ceil(plan.chips - 1e-9)
        if count not in best or plan.output_tps > best[count].output_tps:
            best[count] = plan
    curve, top = [], 0.0
    for count in sorted(best):
        if best[count].output_tps > top:
            curve.append(best[count])
            top = best[count].output_tps
    return curve


def chips_to_match(plans: list[Plan], chip_key: str, target_tps: float) -> tuple[int, Plan] | None:
    """Fewest chips of one kind whose replicated best plan reaches `target_tps` output tokens/s."""
    best = None
    for plan in plans:
        if plan.chip.key != chip_key or plan.prefill_chip is not None:
            continue
        replicas = math.ceil(target_tps / plan.output_tps - 1e-9)
        count = math.ceil(replicas * plan.chips - 1e-9)
        if best is None or count < best[0] or (count == best[0] and plan.output_tps > best[1].output_tps):
            best = (count, plan)
    return best


def explain_infeasible(shape: ModelShape, chip: Chip, work: Workload, factors: Factors, max_chips: int,
                       quants: list[str] | None = None) -> str:
    """Why no plan on `chip` meets the limits: which limit binds and by how much, at the best layout tried."""
    formats = [q for q in (quants or QUANTS) if q in ("bf16", "int4") or chip.has_compute(q)]
    fastest_tpot, fastest_ttft, where = math.inf, math.inf, None
    fits_any = False
    for layout in candidate_layouts(shape, chip, max_chips):
        for quant in formats:
            dep = Deployment(chip, layout, quant=quant, kv_dtype=work.kv_dtype, mtp_tokens=work.mtp_tokens,
                             mtp_acceptance=work.mtp_acceptance)
            if max_decode_seqs(shape, dep, work.input_len + work.output_len) < 1:
                continue
            fits_any = True
            tpot = _tpot_decode(shape, dep, factors, 1, work.decode_context)
            ttft = prefill_time(shape, dep, factors, 1, work.input_len)[0]
            if tpot < fastest_tpot:
                fastest_tpot, where = tpot, f"{layout.describe()} {quant}"
            fastest_ttft = min(fastest_ttft, ttft)
    if not fits_any:
        need = shape.weight_bytes_total(formats[-1]) / 1e9
        return (f"{chip.key}: the model does not fit in memory on up to {max_chips} chips "
                f"({need:.0f} GB of weights in {formats[-1]}, {chip.memory_gb:g} GB per chip); raise --max-chips")
    parts = []
    if work.tpot_s is not None and fastest_tpot > work.tpot_s:
        parts.append(f"TPOT limit {work.tpot_s * 1e3:g} ms binds: the fastest layout ({where}) needs "
                     f"{fastest_tpot * 1e3:.1f} ms per token even for one sequence, "
                     f"{fastest_tpot / work.tpot_s:.2f}x the limit")
    if work.ttft_s is not None and fastest_ttft > work.ttft_s:
        parts.append(f"TTFT limit {work.ttft_s * 1e3:g} ms binds: one {work.input_len}-token prompt takes at least "
                     f"{fastest_ttft * 1e3:.0f} ms, {fastest_ttft / work.ttft_s:.2f}x the limit")
    if not parts:
        parts.append("TTFT and TPOT can each be met alone but not together with a prefill in the same instance; "
                     "try a looser --ttft or --tpot")
    return f"{chip.key}: " + "; ".join(parts)
