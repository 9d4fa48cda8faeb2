"""`shoal plan --validate`: predict published deployments (deployments.toml) with the cost model.

The compute-efficiency factor of each phase is fitted on the cases marked role = "fit" and then
used, unchanged, for every case; the cases marked "holdout" are predictions. The other factors keep
their assumed defaults (ASSUMED below). Nothing here knows a published figure except through the fit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from shoal.planner.catalog import Chip, load_catalog
from shoal.planner.cost import Deployment, Factors, Layout, check_layout, decode_step_time, max_decode_seqs, \
    prefill_time
from shoal.planner.errors import PlanError
from shoal.planner.shapes import ModelShape, load_shape
from shoal.planner.fitting import golden_section_min

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

DEPLOYMENTS = Path(__file__).with_name("deployments.toml")
# Factors that are assumed rather than fitted, with why.
ASSUMED = {
    "memory": (0.8, "HBM reaches ~80% of its datasheet bandwidth in streaming kernels"),
    "link": (0.8, "NCCL/DeepEP-class collectives reach ~80% of link bandwidth on large messages"),
    "overlap": (0.5, "two-microbatch overlap hides about half of the shorter of compute and communication "
                     "(SGLang reports +27-35% prefill throughput from it)"),
    "step_overhead_us": (0.0, "scheduling overlaps the previous step"),
}
# Fitted factors -> the phase whose fit cases they are fitted on. Compute efficiency is fitted per chip
# family (its software stack: CUDA kernels and CANN kernels reach different shares of peak); the
# fixed per-layer cost is fitted once, on every family's decode cases.
FAMILY_FITTED = {"prefill_compute": "prefill", "decode_compute": "decode"}
SHARED_FITTED = {"layer_overhead_us": "decode"}
BOUNDS = {"prefill_compute": (0.02, 1.0), "decode_compute": (0.02, 1.0), "layer_overhead_us": (0.0, 1000.0)}
DEFAULT = "*"  # factor-set key for chips of a family without fit cases


def factors_for(chip: Chip, factor_set: dict[str, Factors]) -> Factors:
    """The factors a chip is planned with: its family's fitted set (or the default set), then any
    factors its catalog entry or a calibration gives it."""
    base = factor_set.get(chip.family, factor_set[DEFAULT])
    return base.replaced(**chip.efficiency) if chip.efficiency else base


@dataclass
class Case:
    id: str
    role: str
    phase: str
    model: str
    chip: str
    chips: int
    published: float
    per_chips: int
    published_text: str
    source: str
    assumptions: str
    tp: int = 1
    ep: int = 1
    pp: int = 1
    redundant_experts: int = 0
    quant: str = "bf16"
    kv_dtype: str = "bf16"
    prompt_len: int = 0
    prompts_per_chip: float = 1
    cache_hit_rate: float = 0.0
    context: int = 0
    tpot_ms: float | None = None
    batch_per_chip: float | None = None
    mtp_tokens: int = 0
    mtp_acceptance: float = 0.0

    @property
    def published_per_chip(self) -> float:
        return self.published / self.per_chips


def load_cases(path: str | Path = DEPLOYMENTS) -> list[Case]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"cannot read deployments file {path}: {exc}") from None
    cases = []
    for entry in data.get("case", []):
        try:
            case = Case(**entry)
        except TypeError as exc:
            raise PlanError(f"{path}: case {entry.get('id', '?')}: {exc}") from None
        if case.phase not in ("prefill", "decode") or case.role not in ("fit", "holdout"):
            raise PlanError(f"{path}: case {case.id}: phase must be prefill or decode, role fit or holdout")
        cases.append(case)
    return cases


def deployment_for(case: Case, chip: Chip) -> Deployment:
    return Deployment(chip=chip, layout=Layout(case.chips, tp=case.tp, ep=case.ep, pp=case.pp,
                                               redundant_experts=case.redundant_experts),
                      quant=case.quant, kv_dtype=case.kv_dtype, mtp_tokens=case.mtp_tokens,
                      mtp_acceptance=case.mtp_acceptance)


def best_decode_batch(shape: ModelShape, dep: Deployment, factors: Factors, context: float,
                      tpot_s: float | None, limit: int | None = None) -> tuple[int, float]:
    """The largest number of sequences on one instance whose time per output token is within `tpot_s`
    and that fits in memory, and that TPOT; (0, tpot of one sequence) when none meets the limit."""
    top = max_decode_seqs(shape, dep, int(context))
    if limit is not None:
        top = min(top, limit)
    if top < 1:
        return 0, math.inf

    def tpot(seqs: int) -> float:
        return decode_step_time(shape, dep, factors, seqs, context)[0] / dep.tokens_per_step

    if tpot_s is None or tpot(top) <= tpot_s:
        return top, tpot(top)
    if tpot(1) > tpot_s:
        return 0, tpot(1)
    low, high = 1, top  # tpot(low) <= limit < tpot(high)
    while high - low > 1:
        mid = (low + high) // 2
        if tpot(mid) <= tpot_s:
            low = mid
        else:
            high = mid
    return low, tpot(low)


def predict(case: Case, factors: Factors, chip: Chip, shape: ModelShape) -> dict:
    """The case's figure per chip as the cost model predicts it, with what it chose."""
    dep = deployment_for(case, chip)
    check_layout(shape, dep.layout)
    if case.phase == "prefill":
        prompts = max(1, round(case.prompts_per_chip * case.chips))
        cached = int(case.prompt_len * case.cache_hit_rate)
        seconds, stage = prefill_time(shape, dep, factors, prompts, case.prompt_len, cached)
        value = prompts * case.prompt_len / seconds / case.chips
        return {"predicted": value, "batch": f"{prompts} x {case.prompt_len} tokens", "time_ms": seconds * 1e3,
                "pieces": stage.pieces, "comm": stage.comm}
    limit = None if case.batch_per_chip is None else round(case.batch_per_chip * case.chips)
    tpot_s = None if case.tpot_ms is None else case.tpot_ms / 1e3
    seqs, tpot = best_decode_batch(shape, dep, factors, case.context, tpot_s, limit)
    if seqs == 0:
        return {"predicted": 0.0, "batch": "none meets the TPOT", "time_ms": tpot * 1e3, "pieces": {}, "comm": {}}
    step, stage = decode_step_time(shape, dep, factors, seqs, case.context)
    value = seqs * dep.tokens_per_step / step / case.chips
    return {"predicted": value, "batch": f"{seqs / case.chips:.0f} seqs/chip", "time_ms": tpot * 1e3,
            "pieces": stage.pieces, "comm": stage.comm}


def fit_factors(cases: list[Case], catalog: dict[str, Chip], rounds: int = 4) -> dict[str, Factors]:
    """Fit FAMILY_FITTED per chip family and SHARED_FITTED across families (least squares in log
    error, coordinate descent) on the cases of role "fit"; the rest keep the ASSUMED values. Returns
    one Factors per family with fit cases, plus DEFAULT (geometric mean of the families) for others."""
    start = Factors(**{k: v for k, (v, _) in ASSUMED.items()})
    fit = [c for c in cases if c.role == "fit"]
    families = sorted({catalog[c.chip].family for c in fit})
    values: dict[tuple[str, str], float] = {}
    for family in families:
        for name, phase in FAMILY_FITTED.items():
            if any(catalog[c.chip].family == family and c.phase == phase for c in fit):
                values[(family, name)] = getattr(start, name)
    for name, phase in SHARED_FITTED.items():
        if any(c.phase == phase for c in fit):
            values[(DEFAULT, name)] = getattr(start, name)

    def build(vals: dict[tuple[str, str], float]) -> dict[str, Factors]:
        shared = {name: v for (fam, name), v in vals.items() if fam == DEFAULT}
        result = {}
        for family in families:
            own = {name: v for (fam, name), v in vals.items() if fam == family}
            result[family] = start.replaced(**shared, **own)
        means = {}
        for name in FAMILY_FITTED:
            got = [v for (fam, n), v in vals.items() if n == name and fam != DEFAULT]
            if got:
                means[name] = round(math.exp(sum(math.log(v) for v in got) / len(got)), 4)
        result[DEFAULT] = start.replaced(**shared, **means)
        return result

    def loss(vals) -> float:
        sets = build(vals)
        total = 0.0
        for case in fit:
            chip = catalog[case.chip]
            got = predict(case, sets[chip.family], chip, _shape(case.model))["predicted"]
            total += (math.log(max(got, 1e-9) / case.published_per_chip)) ** 2
        return total

    for _ in range(rounds):
        for key in list(values):
            values[key] = round(golden_section_min(lambda v, key=key: loss({**values, key: v}), *BOUNDS[key[1]], iters=28), 4)
    return build(values)


@lru_cache(maxsize=None)
def _shape(model: str) -> ModelShape:
    return load_shape(model)


@lru_cache(maxsize=1)
def published_fit() -> dict[str, Factors]:
    """The factors fitted on the shipped deployments' fit cases: the planner's defaults for catalog chips."""
    return fit_factors(load_cases(), load_catalog())


def provenance(cases: list[Case], catalog: dict[str, Chip], sets: dict[str, Factors]) -> list[dict]:
    """One row per factor and family: its value and either the cases it was fitted on or why it is assumed."""
    rows = []
    for family, factors in sets.items():
        for name, phase in {**FAMILY_FITTED, **SHARED_FITTED}.items():
            on = [c.id for c in cases if c.role == "fit" and c.phase == phase
                  and (name in SHARED_FITTED or family == DEFAULT or catalog[c.chip].family == family)]
            how = f"on {', '.join(on)}" if on else "not fitted"
            if family == DEFAULT and name in FAMILY_FITTED:
                how = "geometric mean of the families' values (for chips of other families)"
            if name in SHARED_FITTED and family != DEFAULT:
                continue
            rows.append({"family": family, "factor": name, "value": getattr(factors, name), "how": how,
                         "fitted": bool(on)})
    for name, (value, why) in ASSUMED.items():
        rows.append({"family": "all", "factor": name, "value": value, "how": f"assumed: {why}", "fitted": False})
    return rows


def leave_one_out(case: Case, cases: list[Case], catalog: dict[str, Chip]) -> float:
    """The error predicting `case` from factors fitted without it: a real prediction for a fit case.
    Where no other case of its family and phase is left to fit on, its family borrows the other
    families' value (the DEFAULT set), as a chip of an unfitted family would."""
    rest = [dataclasses.replace(c, role="holdout") if c.id == case.id else c for c in cases]
    sets = fit_factors(rest, catalog)
    chip = catalog[case.chip]
    used = sets.get(chip.family, sets[DEFAULT])
    name = "prefill_compute" if case.phase == "prefill" else "decode_compute"
    if not any(c.role == "fit" and c.phase == case.phase and catalog[c.chip].family == chip.family for c in rest):
        used = used.replaced(**{name: getattr(sets[DEFAULT], name)})
    return predict(case, used, chip, _shape(case.model))["predicted"] / case.published_per_chip - 1


def validate(path: str | Path = DEPLOYMENTS, catalog: dict[str, Chip] | None = None,
             with_leave_one_out: bool = True) -> dict:
    """Fit on the fit cases, predict every case; returns factors, provenance and one row per case.
    With `with_leave_one_out`, each fit case is also predicted from a fit without it."""
    catalog = catalog or load_catalog()
    cases = load_cases(path)
    for case in cases:
        if case.chip not in catalog:
            raise PlanError(f"case {case.id}: unknown chip {case.chip!r}")
    sets = fit_factors(cases, catalog)
    rows = []
    for case in cases:
        chip = catalog[case.chip]
        used = sets.get(chip.family, sets[DEFAULT])
        result = predict(case, used, chip, _shape(case.model))
        error = result["predicted"] / case.published_per_chip - 1
        rows.append({
            "id": case.id, "role": case.role, "phase": case.phase, "chip": case.chip, "family": chip.family,
            "published_per_chip": case.published_per_chip, "predicted_per_chip": result["predicted"],
            "error": error, "batch": result["batch"], "time_ms": result["time_ms"],
            "published_text": case.published_text, "source": case.source, "assumptions": case.assumptions,
            "left_out_error": (leave_one_out(case, cases, catalog)
                               if with_leave_one_out and case.role == "fit" else None),
        })
    return {"factors": {k: asdict(v) for k, v in sets.items()}, "provenance": provenance(cases, catalog, sets),
            "cases": rows}


def format_validation(report: dict) -> str:
    lines = ["Efficiency factors used (FITTED ones are fits to the published figures below, not predictions):"]
    for row in report["provenance"]:
        mark = "FITTED " if row["fitted"] else ""
        lines.append(f"  {row['family']:<7} {row['factor']:<18} {row['value']:<8g} {mark}{row['how']}")
    header = ["case", "role", "phase", "chip", "published/chip", "predicted/chip", "error", "left out",
              "batch", "TTFT/TPOT ms"]
    rows = [header]
    for row in report["cases"]:
        left_out = row.get("left_out_error")
        rows.append([row["id"], row["role"], row["phase"], row["chip"], f"{row['published_per_chip']:.0f}",
                     f"{row['predicted_per_chip']:.0f}", f"{row['error']:+.1%}",
                     "-" if left_out is None else f"{left_out:+.1%}", row["batch"], f"{row['time_ms']:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["", "Published deployments (tokens/s per chip; prefill: input tokens, decode: output tokens):"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    holdout = [abs(r["error"]) for r in report["cases"] if r["role"] == "holdout"]
    worst = max((abs(r["error"]) for r in report["cases"]), default=0.0)
    left_out = [abs(r["left_out_error"]) for r in report["cases"] if r.get("left_out_error") is not None]
    lines += ["", f"worst error {worst:.1%}; held-out cases: {len(holdout)}, worst held-out error "
              f"{max(holdout, default=0.0):.1%}"]
    if left_out:
        lines.append(f"left out: each fit case predicted from a fit without it (its family borrows the other "
                     f"families' factor when it was the only case); worst {max(left_out):.1%}")
    lines.append("Sources and assumptions of each case: shoal/planner/deployments.toml (or --json).")
    return "\n".join(lines)
