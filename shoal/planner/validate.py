"""`shoal plan --validate [FILE]`: predict measured deployments (shoal/planner/cases.json, or a file in
the same public format) with the cost model, and say how far off each prediction is.

The compute efficiency of each phase is fitted per chip family, and a fixed per-layer cost once, on
the cases marked role "fit" (least squares in log error over every measured figure); holdout cases
are predictions. Each fit case is also predicted from a fit without it (leave-one-out), which is the
error to expect on a deployment the planner has not seen. The other factors keep the ASSUMED values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from shoal.planner.cases import SHIPPED_CASES, Case, load_cases
from shoal.planner.catalog import Chip, load_catalog
from shoal.planner.cost import Factors
from shoal.planner.fitting import golden_section_min
from shoal.planner.predict import check_case, predict
from shoal.planner.shapes import ModelShape, load_shape

DEPLOYMENTS = SHIPPED_CASES  # the name the planner's CLI knew them by
# Factors that are assumed rather than fitted, with why.
ASSUMED = {
    "memory": (0.8, "HBM reaches ~80% of its datasheet bandwidth in streaming kernels"),
    "link": (0.8, "NCCL/DeepEP-class collectives reach ~80% of link bandwidth on large messages"),
    "overlap": (0.5, "two-microbatch overlap hides about half of the shorter of compute and communication "
                     "(SGLang reports +27-35% prefill throughput from it)"),
    "step_overhead_us": (0.0, "scheduling overlaps the previous step"),
    "layer_overhead_us": (0.0, "graph capture (CUDA graphs, ACL graphs) replays a step's kernels back to back"),
    "decode_compute": (0.5, "unused: with matmul_half_tokens > 0 a matmul's efficiency follows its rows, not its phase"),
}
# Fitted factors -> the phases whose cases inform them. Matmul efficiency is fitted per chip family
# (its software stack: CUDA kernels and CANN kernels reach different shares of peak), as is the fixed
# cost of an expert-parallel layer (DeepEP's and CANN's collectives differ); a matmul reaches it in
# proportion to its rows (m / (m + matmul_half_tokens), one value for all families), so one factor
# serves prefill, decode and a chunked step alike. Grouped-expert efficiency (Factors.expert_efficiency)
# fitted to 1.0 once these were in, so it is no longer fitted.
FAMILY_FITTED = {"prefill_compute": ("prefill", "decode", "both"), "ep_layer_us": ("decode", "both")}
# The attention kernels' share of peak (flash / MLA kernels, tuned apart from the GEMMs, and most of a
# step at long context) is one value for all families: fitted per family it followed each family's
# GEMM efficiency and left a family's only prefill case out of sample by +54% (cm384-prefill).
SHARED_FITTED = {"matmul_half_tokens": ("prefill", "decode", "both"), "attention_compute": ("prefill", "decode", "both")}
# A family fits as many of its own factors as it has cases that inform them: one case cannot tell a
# fixed cost from an efficiency, so with fewer cases the fixed costs are the ones borrowed (the other
# families' mean). Two cases of different loads (a prefill and a decode, or two TPOT limits) can.
FIXED_COSTS = ("ep_layer_us",)
BOUNDS = {"prefill_compute": (0.02, 1.0), "ep_layer_us": (0.0, 2000.0), "matmul_half_tokens": (1.0, 4000.0),
          "attention_compute": (0.02, 1.0)}
DEFAULT = "*"  # factor-set key for chips of a family without fit cases


def factors_for(chip: Chip, factor_set: dict[str, Factors]) -> Factors:
    """The factors a chip is planned with: its family's fitted set (or the default set), then any
    factors its catalog entry or a calibration gives it."""
    base = factor_set.get(chip.family, factor_set[DEFAULT])
    if not chip.efficiency:
        return base
    # a calibration (or a catalog entry) gives per-phase efficiencies: they apply as given, not by rows
    # (and its own efficiency for attention too: the published attention factor is a GPU/NPU kernel's)
    return base.replaced(**{"matmul_half_tokens": 0.0, "attention_compute": 0.0, **chip.efficiency})


@lru_cache(maxsize=None)
def _shape(model: str) -> ModelShape:
    return load_shape(model)


def predict_with(case: Case, sets: dict[str, Factors], catalog: dict[str, Chip]) -> dict:
    """The case predicted with each chip's family factors (a mixed fleet's prefill chip its own)."""
    chip = catalog[case.chip]
    prefill = None
    if case.prefill_chip != case.chip:
        other = catalog[case.prefill_chip]
        prefill = (other, sets.get(other.family, sets[DEFAULT]))
    return predict(case, sets.get(chip.family, sets[DEFAULT]), chip, _shape(case.model), prefill)


def case_loss(case: Case, sets: dict[str, Factors], catalog: dict[str, Chip]) -> float:
    """Mean squared log error over the case's measured figures."""
    got = predict_with(case, sets, catalog)["predicted"]
    total = 0.0
    for key, value in case.measured.items():
        total += math.log(max(min(got[key], 1e12), 1e-9) / value) ** 2
    return total / len(case.measured)


_FITS: dict[str, dict[str, Factors]] = {}


def fit_factors(cases: list[Case], catalog: dict[str, Chip], rounds: int = 3) -> dict[str, Factors]:
    """The fit below, remembered for the same fit cases and chips (a file of holdout cases reuses the
    shipped fit)."""
    fit = [c for c in cases if c.role == "fit"]
    key = json.dumps([[{k: v for k, v in asdict(c).items() if k != "origin"} for c in fit],
                      [[asdict(catalog[c.chip]), asdict(catalog[c.prefill_chip])] for c in fit], rounds],
                     sort_keys=True, default=str)
    if key not in _FITS:
        _FITS[key] = _fit_factors(fit, catalog, rounds)
    return _FITS[key]


def family_fitted(family: str, fit: list[Case], catalog: dict[str, Chip]) -> list[str]:
    """The FAMILY_FITTED factors a family fits its own value of, on its cases of role "fit"."""
    own = [c for c in fit if catalog[c.chip].family == family]
    informed = [name for name in FAMILY_FITTED if any(_informs(c, name) for c in own)]
    cases = [c for c in own if any(_informs(c, name) for name in informed)]
    while len(informed) > len(cases) and any(name in FIXED_COSTS for name in informed):
        informed.remove(next(name for name in reversed(informed) if name in FIXED_COSTS))
    return informed


def _informs(case: Case, name: str) -> bool:
    """Whether a fit case says anything about factor `name` (an expert-parallel cost needs ep > 1)."""
    phases = {**FAMILY_FITTED, **SHARED_FITTED}[name]
    if case.role != "fit" or case.phase not in phases:
        return False
    if name == "ep_layer_us":
        layouts = case.disaggregated.values() if case.disaggregated else [{"ep": case.ep}]
        return any(lay.get("ep", 1) > 1 for lay in layouts)
    return True


# Where the descent starts a fitted factor other than at its Factors default: matmul_half_tokens = 0
# would switch the cost model to per-phase efficiencies while the others are fitted first, and lead
# the descent elsewhere (attention_compute's default 0, "as the matmuls", is a fine start).
START = {"matmul_half_tokens": 1.0}


def _inside(name: str, value: float) -> float:
    return START.get(name, value)


def _fit_factors(cases: list[Case], catalog: dict[str, Chip], rounds: int) -> dict[str, Factors]:
    """Fit FAMILY_FITTED per chip family and SHARED_FITTED across families (coordinate descent,
    golden section) on the cases of role "fit"; the rest keep the ASSUMED values. A family fits its
    own value of the factors `family_fitted` gives it, and otherwise takes the mean of the families
    that do (DEFAULT, also the set for chips of families without fit cases)."""
    start = Factors(**{k: v for k, (v, _) in ASSUMED.items()})
    fit = [c for c in cases if c.role == "fit"]
    families = sorted({catalog[c.chip].family for c in fit})
    values: dict[tuple[str, str], float] = {}
    for family in families:
        for name in family_fitted(family, fit, catalog):
            values[(family, name)] = _inside(name, getattr(start, name))
    for name in SHARED_FITTED:
        if any(_informs(c, name) for c in fit):
            values[(DEFAULT, name)] = _inside(name, getattr(start, name))

    def build(vals: dict[tuple[str, str], float]) -> dict[str, Factors]:
        shared = {name: v for (fam, name), v in vals.items() if fam == DEFAULT}
        means = {}
        for name in FAMILY_FITTED:
            got = [v for (fam, n), v in vals.items() if n == name and fam != DEFAULT]
            if got:  # geometric mean of efficiencies; a fixed cost may be 0, so its mean is arithmetic
                means[name] = round(math.exp(sum(math.log(v) for v in got) / len(got)) if min(got) > 0
                                    else sum(got) / len(got), 4)
        result = {family: start.replaced(**{**shared, **means,
                                            **{n: v for (f, n), v in vals.items() if f == family}})
                  for family in families}
        result[DEFAULT] = start.replaced(**shared, **means)
        return result

    def loss(vals, only_family: str | None = None) -> float:
        sets = build(vals)
        return sum(case_loss(c, sets, catalog) for c in fit if only_family is None
                   or only_family in (catalog[c.chip].family, catalog[c.prefill_chip].family))

    for _ in range(rounds):
        for key in list(values):
            family = None if key[0] == DEFAULT else key[0]  # a family's factor moves only its own cases
            values[key] = round(golden_section_min(
                lambda v, key=key: loss({**values, key: v}, family), *BOUNDS[key[1]], iters=22), 4)
    return build(values)


@lru_cache(maxsize=1)
def published_fit() -> dict[str, Factors]:
    """The factors fitted on the shipped cases of role "fit": the planner's defaults for catalog chips."""
    return fit_factors(load_cases(), load_catalog())


def provenance(cases: list[Case], catalog: dict[str, Chip], sets: dict[str, Factors]) -> list[dict]:
    """One row per factor and family: its value and either the cases it was fitted on or why it is assumed."""
    rows = []
    fit = [c for c in cases if c.role == "fit"]
    for family, factors in sets.items():
        for name, phases in {**FAMILY_FITTED, **SHARED_FITTED}.items():
            if name in SHARED_FITTED and family != DEFAULT:
                continue
            on = [c.name for c in cases if _informs(c, name)
                  and (name in SHARED_FITTED or family == DEFAULT or catalog[c.chip].family == family)]
            how = f"on {', '.join(on)}" if on else "not fitted"
            if family == DEFAULT and name in FAMILY_FITTED:
                how = "mean of the families' own values (for chips of other families)"
            elif name in FAMILY_FITTED and on and name not in family_fitted(family, fit, catalog):
                how = f"mean of the other families' values (only {', '.join(on)} of its own: too few cases)"
                on = []
            rows.append({"family": family, "factor": name, "value": getattr(factors, name), "how": how,
                         "fitted": bool(on)})
    for name, (value, why) in ASSUMED.items():
        rows.append({"family": "all", "factor": name, "value": value, "how": f"assumed: {why}", "fitted": False})
    return rows


def _sets_without(case: Case, pool: list[Case], catalog: dict[str, Chip]) -> dict[str, Factors]:
    """Factors fitted without `case`; where no case of its family informs a factor any more, the
    family borrows the other families' value (as a chip of an unfitted family would)."""
    rest = [dataclasses.replace(c, role="holdout") if c.name == case.name and c.origin == case.origin else c
            for c in pool]
    return fit_factors(rest, catalog)


def errors(case: Case, predicted: dict[str, float]) -> dict[str, float]:
    return {key: predicted[key] / value - 1 for key, value in case.measured.items()}


def validate(path: str | Path = SHIPPED_CASES, catalog: dict[str, Chip] | None = None,
             with_leave_one_out: bool = True) -> dict:
    """Fit on the fit cases (the shipped ones and the file's), predict every case of the file; with
    `with_leave_one_out`, each of its fit cases is also predicted from a fit without it."""
    catalog = catalog or load_catalog()
    cases = load_cases(path)
    pool = list(cases)
    if Path(path).resolve() != SHIPPED_CASES.resolve():
        names = {c.name for c in cases}
        pool += [c for c in load_cases(SHIPPED_CASES) if c.name not in names]
    for case in pool:
        check_case(case, catalog, _shape)
    sets = fit_factors(pool, catalog)
    rows = []
    for case in cases:
        chip = catalog[case.chip]
        result = predict_with(case, sets, catalog)
        predicted = {k: result["predicted"][k] for k in case.measured}
        row = {"name": case.name, "role": case.role, "phase": case.phase, "chip": case.chip,
               "family": chip.family, "chips": case.chips, "measured": dict(case.measured), "predicted": predicted,
               "error": errors(case, predicted), "primary": case.primary_key, "load": result["load"],
               "bound": result["bound"], "source": case.source, "assumptions": case.assumptions,
               "left_out_error": None}
        if with_leave_one_out and case.role == "fit":
            left = predict_with(case, _sets_without(case, pool, catalog), catalog)["predicted"]
            row["left_out_error"] = errors(case, left)
        rows.append(row)
    return {"factors": {k: asdict(v) for k, v in sets.items()}, "provenance": provenance(pool, catalog, sets),
            "cases": rows, "summary": summary(rows)}


def summary(rows: list[dict]) -> dict:
    """Median and largest absolute error of each case's primary figure: fitted, left out, held out."""
    def stats(values: list[float]) -> dict | None:
        values = [abs(v) for v in values]
        return {"n": len(values), "median": statistics.median(values), "max": max(values)} if values else None

    fitted = [r["error"][r["primary"]] for r in rows]
    left = [r["left_out_error"][r["primary"]] for r in rows if r["left_out_error"]]
    held = [r["error"][r["primary"]] for r in rows if r["role"] == "holdout"]
    return {"fitted": stats(fitted), "left_out": stats(left), "holdout": stats(held),
            "out_of_sample": stats(left + held)}


SHORT = {"output_tok_s_per_chip": "out/chip", "input_tok_s_per_chip": "in/chip", "tpot_ms": "TPOT", "ttft_ms": "TTFT"}


def _figure(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def format_validation(report: dict) -> str:
    lines = ["Efficiency factors used (FITTED ones are fits to the measured figures below, not predictions):"]
    for row in report["provenance"]:
        mark = "FITTED " if row["fitted"] else ""
        lines.append(f"  {row['family']:<7} {row['factor']:<18} {row['value']:<8g} {mark}{row['how']}")
    header = ["case", "role", "phase", "chip", "figure", "measured", "predicted", "fitted", "left out", "load"]
    table = [header]
    for row in report["cases"]:
        for i, key in enumerate(row["measured"]):
            left = row["left_out_error"]
            table.append([row["name"] if i == 0 else "", row["role"] if i == 0 else "", row["phase"] if i == 0 else "",
                          row["chip"] if i == 0 else "", SHORT[key] + ("*" if key == row["primary"] else ""),
                          _figure(row["measured"][key]), _figure(row["predicted"][key]), f"{row['error'][key]:+.1%}",
                          "-" if left is None else f"{left[key]:+.1%}", row["load"] if i == 0 else ""])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines += ["", "Measured deployments (tokens/s per chip, ms; * the figure a case is judged by):"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append("")
    labels = {"fitted": "with the fitted factors (every case)", "left_out": "left out of the fit, one at a time",
              "holdout": "held out (never fitted)", "out_of_sample": "out of sample (left out + held out)"}
    for key, label in labels.items():
        got = report["summary"][key]
        if got:
            lines.append(f"{label}: {got['n']} cases, median error {got['median']:.1%}, largest {got['max']:.1%}")
    lines.append("Sources and assumptions of each case: the cases file (or --json).")
    return "\n".join(lines)
