"""One case's measured figures as the cost model predicts them (validate.py fits and compares them).

Phase "prefill": batches of prompts -> input tokens/s per chip and the batch's time (TTFT).
Phase "decode": a batch of sequences -> output tokens/s per chip and TPOT.
Phase "both": serving at a concurrency (serving.py) -> all four figures.
"""

from __future__ import annotations

import math

from shoal.errors import ShoalError
from shoal.planner.cases import MEASURED_KEYS, Case
from shoal.planner.catalog import Chip
from shoal.planner.cost import Deployment, Factors, Layout, check_layout, decode_step_time, max_decode_seqs, \
    prefill_time, weights_per_chip
from shoal.planner.errors import PlanError
from shoal.planner.serving import colocated, disaggregated
from shoal.planner.shapes import ModelShape, kv_bytes, weight_bytes


def _layout(spec: dict, case: Case) -> Layout:
    tp, pp = spec.get("tp", 1), spec.get("pp", 1)
    ep = spec.get("ep", 1)
    return Layout(spec["chips"], tp=tp, ep=ep, pp=pp,
                  redundant_experts=spec.get("redundant_experts", case.redundant_experts if ep > 1 else 0))


def deployments_for(case: Case, chip: Chip, prefill_chip: Chip | None = None,
                    shape: ModelShape | None = None) -> list[Deployment]:
    """The serving instance of a case (two for a disaggregated one: prefill, on `prefill_chip` when
    it is another kind, then decode); with `shape`, a kv_free_fraction becomes the memory share it means."""
    if case.disaggregated:
        pairs = [(prefill_chip or chip, _layout(case.disaggregated["prefill"], case)),
                 (chip, _layout(case.disaggregated["decode"], case))]
    else:
        pairs = [(chip, Layout(case.chips, tp=case.tp, ep=case.ep, pp=case.pp,
                               redundant_experts=case.redundant_experts))]
    deps = [Deployment(chip=kind, layout=lay, quant=case.weights, kv_dtype=case.kv_dtype, mtp_tokens=case.mtp_tokens,
                       mtp_acceptance=case.mtp_acceptance, expert_imbalance=case.expert_imbalance,
                       memory_util=case.memory_util, kv_reads=case.kv_reads) for kind, lay in pairs]
    if case.kv_free_fraction is not None and shape is not None:
        for dep in deps:
            total = dep.chip.memory_gb * 1e9
            weights = weights_per_chip(shape, dep)
            dep.memory_util = min(1.0, (weights + case.kv_free_fraction * max(total - weights, 0.0)) / total)
    return deps


def check_case(case: Case, catalog: dict[str, Chip], shape_of) -> None:
    """Refuse, in one line, a case whose chip, model, formats or layout the planner cannot use."""
    where = f"{case.origin}: case {case.name!r}"
    for key in dict.fromkeys((case.chip, case.prefill_chip)):
        if key not in catalog:
            raise PlanError(f"{where}: unknown chip {key!r}; the catalog has {', '.join(sorted(catalog))} "
                            "(add your own with --catalog FILE)")
    try:
        shape = shape_of(case.model)
        weight_bytes(case.weights)
        kv_bytes(case.kv_dtype)
        for dep in deployments_for(case, catalog[case.chip], catalog[case.prefill_chip], shape):
            check_layout(shape, dep.layout)
            if max_decode_seqs(shape, dep, int(case.context) or 1) < 1:
                raise PlanError(f"the weights do not fit on {dep.layout.describe()} of {case.chip}")
    except ShoalError as exc:
        raise PlanError(f"{where}: {exc}") from None


def largest_batch_within(tpot, top: int, limit_s: float) -> int:
    """The largest n in [1, top] with tpot(n) <= limit_s (0 if none); tpot grows with n and is nearly
    linear, so a secant guess between the bracketing points finds it in a few evaluations."""
    t_top = tpot(top)
    if t_top <= limit_s:
        return top
    t_low = tpot(1)
    if t_low > limit_s:
        return 0
    low, high = 1, top
    secant = True
    while high - low > 1:
        guess = low + (limit_s - t_low) / (t_top - t_low) * (high - low) if secant else (low + high) / 2
        secant = not secant  # alternate with halving, so a curved tpot still converges in log steps
        mid = min(high - 1, max(low + 1, int(guess)))
        t_mid = tpot(mid)
        if t_mid <= limit_s:
            low, t_low = mid, t_mid
            if mid + 1 < high and tpot(mid + 1) > limit_s:
                return mid
        else:
            high, t_top = mid, t_mid
    return low


def predict(case: Case, factors: Factors, chip: Chip, shape: ModelShape,
            prefill: tuple[Chip, Factors] | None = None) -> dict:
    """{"predicted": {key: value} for every key the phase predicts, "load": what was assumed, "bound": ...}.
    `prefill`: the chip and factors of a mixed fleet's prefill instance (else the case's own)."""
    deps = deployments_for(case, chip, prefill[0] if prefill else None, shape)
    dep = deps[-1]
    n = case.chips
    cached = int(case.input_len * case.cache_hit_rate)
    if case.phase == "prefill":
        if case.tokens_per_chip is not None:
            prompts = max(1, round(case.tokens_per_chip * n / case.input_len))
        elif case.concurrency is not None:
            prompts = max(1, round(case.concurrency))
        else:
            prompts = max(1, round(case.batch_per_chip * n))
        seconds, stage = prefill_time(shape, dep, factors, prompts, case.input_len, cached)
        return {"predicted": {"input_tok_s_per_chip": prompts * case.input_len / seconds / n,
                              "ttft_ms": seconds * 1e3},
                "load": f"{prompts} x {case.input_len} tokens", "bound": _bound(stage)}
    if case.phase == "decode":
        top = max_decode_seqs(shape, dep, int(case.context))
        if case.tpot_limit_ms is not None:
            seqs = largest_batch_within(
                lambda s: decode_step_time(shape, dep, factors, s, case.context)[0] / dep.tokens_per_step,
                top, case.tpot_limit_ms / 1e3)
        else:
            wanted = case.concurrency if case.concurrency is not None else case.batch_per_chip * n
            seqs = min(max(1, round(wanted)), top)
        if seqs < 1:
            return {"predicted": {"output_tok_s_per_chip": 0.0, "tpot_ms": math.inf},
                    "load": "no batch meets the TPOT limit", "bound": "latency"}
        step, stage = decode_step_time(shape, dep, factors, seqs, case.context)
        return {"predicted": {"output_tok_s_per_chip": seqs * dep.tokens_per_step / step / n,
                              "tpot_ms": step / dep.tokens_per_step * 1e3},
                "load": f"{seqs / n:.1f} seqs/chip", "bound": _bound(stage)}
    concurrency = case.concurrency if case.concurrency is not None else case.batch_per_chip * n
    if case.disaggregated:
        state = disaggregated(shape, deps[0], deps[1], prefill[1] if prefill else factors, factors, concurrency,
                              case.input_len, case.output_len, cached, case.chunk_tokens)
    else:
        state = colocated(shape, dep, factors, concurrency, case.input_len, case.output_len, cached,
                          case.chunk_tokens)
    return {"predicted": {"output_tok_s_per_chip": state.output_tps / n, "input_tok_s_per_chip": state.input_tps / n,
                          "tpot_ms": state.tpot_s * 1e3, "ttft_ms": state.ttft_s * 1e3},
            "load": f"{concurrency:g} in flight, {state.decoding:.0f} decoding", "bound": state.bound}


def _bound(stage) -> str:
    """What dominates the step: compute, memory or communication."""
    compute = sum(t for k, t in stage.pieces.items() if stage.bound.get(k) == "compute")
    memory = stage.compute_s - compute
    if stage.comm_s > stage.compute_s:
        return "communication"
    return "compute" if compute >= memory else "memory"


def keys_of(case: Case) -> tuple[str, ...]:
    return MEASURED_KEYS[case.phase]
