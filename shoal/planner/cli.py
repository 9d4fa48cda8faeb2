"""`shoal plan`: how many chips of which kind a model needs, at what speed, energy and cost.

Also `--validate` (predict the published deployments) and `--calibrate` (fit this machine's factors
by running shoal's engine here).
"""

from __future__ import annotations

import argparse
import json
import math
import re

from shoal.planner.errors import PlanError

DEFAULT_PLOTS = "shoal_plan"


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    plan = subparsers.add_parser("plan", help="plan chips, layout, speed, energy and cost for a model on paper")
    plan.add_argument("--model", default="deepseek-v3",
                      help="checkpoint folder or config.json (no weights needed), or a bundled config: "
                           "deepseek-v3, llama-3-70b, llama-3-8b, llama-3.1-8b, llama-3.3-70b, llama-2-13b, "
                           "llama-2-70b, qwen3-32b, qwen3-235b-a22b, qwen3-30b-a3b (default deepseek-v3)")
    plan.add_argument("--chips", default="h200,910c", help="comma-separated catalog chips, 'this' = this machine")
    plan.add_argument("--catalog", action="append", default=[], metavar="FILE", help="extra chips (TOML), repeatable")
    plan.add_argument("--tpot", default=None, help="time-per-output-token limit, e.g. 50ms")
    plan.add_argument("--ttft", default=None, help="time-to-first-token limit, e.g. 2s")
    plan.add_argument("--in", dest="input_len", type=int, default=4096, help="prompt tokens (default 4096)")
    plan.add_argument("--out", dest="output_len", type=int, default=512, help="output tokens (default 512)")
    plan.add_argument("--quant", default=None, help="formats to try, e.g. fp8,int8 (default bf16,fp8,int8,int4)")
    plan.add_argument("--kv-dtype", default="bf16", help="KV cache dtype: bf16, fp8, int8")
    plan.add_argument("--mode", default="both", choices=["colocated", "disaggregated", "both", "mixed", "split", "all"],
                      help="prefill and decode on the same chips, on separate chips, or try both; mixed: prefill "
                           "on one chip kind and decode on another; all: every one of these")
    plan.add_argument("--fleet", default=None, metavar="CHIP:N,...",
                      help="the chips you have, e.g. h20:8,910b:16: the best use of them (replicas of one plan, "
                           "mixed plans included) against each kind alone")
    plan.add_argument("--max-chips", type=int, default=64, help="largest serving instance to try (default 64)")
    plan.add_argument("--mtp", type=int, default=0, help="multi-token-prediction draft tokens per step (default 0)")
    plan.add_argument("--mtp-acceptance", type=float, default=0.0,
                      help="acceptance rate of each draft token (measured: `shoal bench --speculative mtp` prints it)")
    plan.add_argument("--expert-imbalance", type=float, default=1.0, help="busiest chip's expert load over the mean")
    plan.add_argument("--objective", default="chip", choices=["chip", "watt", "dollar"],
                      help="rank by output tokens/s per chip, per watt or per dollar")
    plan.add_argument("--match", default=None, metavar="CHIP:N",
                      help="how many chips of each other kind match N chips of CHIP (default: N=8 of the first)")
    plan.add_argument("--top", type=int, default=3, help="plans shown per chip kind (default 3)")
    plan.add_argument("--plots", default=DEFAULT_PLOTS, metavar="PREFIX",
                      help=f"write PREFIX_throughput.png and PREFIX_energy.png, and PREFIX_fleet.png with --fleet "
                           f"(default {DEFAULT_PLOTS})")
    plan.add_argument("--no-plots", action="store_true", help="do not write plots")
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.add_argument("--no-progress", action="store_true", help="no progress bars")
    check = plan.add_argument_group("checks")
    check.add_argument("--validate", nargs="?", const="", default=None, metavar="FILE",
                       help="predict measured deployments and compare: the shipped cases, or FILE in the public "
                            "JSON format (README: `shoal plan`), or the older TOML form; --json prints each case's "
                            "measured and predicted figures")
    check.add_argument("--deployments", default=None, metavar="FILE", help="the same as --validate FILE")
    check.add_argument("--calibrate", action="store_true",
                       help="run shoal's engine here on a few shapes, fit this machine's factors, check a held-back shape")
    check.add_argument("--device", default="cpu", help="device to calibrate (default cpu)")
    check.add_argument("--threads", type=int, default=None,
                       help="torch threads while calibrating a CPU (default 1: on a shared machine a team of "
                            "threads stalls whenever another process holds one of its cores)")
    check.add_argument("--calibration", default=None, metavar="FILE",
                       help="where --calibrate saves its factors and 'this' reads them "
                            "(default ~/.cache/shoal/plan_calibration.json)")
    return plan


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)\s*$")


def parse_duration(text: str | None, flag: str) -> float | None:
    """'50ms' -> 0.05, '2s' -> 2.0; a bare number is refused (its unit would be a guess)."""
    if text is None:
        return None
    match = _DURATION.match(text)
    if not match:
        raise PlanError(f"{flag} takes a duration with its unit, e.g. 50ms or 2s; got {text!r}")
    value = float(match.group(1)) * (1e-3 if match.group(2) == "ms" else 1.0)
    if value <= 0:
        raise PlanError(f"{flag} must be positive, got {text!r}")
    return value


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _plan_row(plan) -> list[str]:
    cost = plan.usd_per_mtok
    kinds = getattr(plan, "kinds", None)  # a plan split over several kinds
    return ["+".join(kinds) if kinds else plan.chip.key, plan.describe(), f"{plan.chips:.1f}", str(plan.seqs), f"{plan.ttft_s * 1e3:.0f}",
            f"{plan.tpot_s * 1e3:.1f}", f"{plan.output_tps:,.0f}", f"{plan.tps_per_chip:,.0f}",
            f"{plan.kwh_per_mtok:.3f}", "-" if cost is None else f"{cost:.2f}"]


HEADER = ["chip", "layout", "chips", "batch", "TTFT ms", "TPOT ms", "out tok/s", "tok/s/chip", "kWh/Mtok", "$/Mtok"]


def cmd_plan(args: argparse.Namespace) -> int:
    if args.validate is not None or args.deployments:
        return _validate(args)
    if args.calibrate:
        return _calibrate(args)
    return _plan(args)


def _validate(args) -> int:
    from shoal.planner.catalog import load_catalog
    from shoal.planner.validate import DEPLOYMENTS, format_validation, validate

    report = validate(args.validate or args.deployments or DEPLOYMENTS, load_catalog(args.catalog))
    if args.json:
        cases = [{k: row[k] for k in ("name", "phase", "chip", "measured", "predicted", "error", "left_out_error",
                                      "role", "load", "bound")} for row in report["cases"]]
        print(json.dumps(_finite({"cases": cases, "summary": report["summary"], "factors": report["factors"],
                                  "provenance": report["provenance"]}), indent=2, allow_nan=False, default=str))
    else:
        print(format_validation(report))
    return 0


def _finite(value):
    """JSON has no infinity: a figure no batch can reach (a TPOT limit nothing meets) prints as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _calibrate(args) -> int:
    from shoal.planner.calibrate import calibrate, default_calibration_path, format_calibration

    report = calibrate(device=args.device, path=args.calibration or default_calibration_path(),
                       progress=not args.no_progress, threads=args.threads)
    print(json.dumps(report, indent=2) if args.json else format_calibration(report))
    return 0


def _plan(args) -> int:
    from shoal.planner.calibrate import load_calibration
    from shoal.planner.catalog import load_catalog, resolve_chips, this_machine
    from shoal.planner.plots import have_matplotlib, write_plots
    from shoal.planner.search import OBJECTIVES, QUANTS, Workload, chips_to_match, explain_infeasible, \
        pareto_front, search
    from shoal.planner.shapes import KV_BYTES, load_shape
    from shoal.planner.validate import factors_for, published_fit

    for name in ("input_len", "output_len", "max_chips"):
        if getattr(args, name) < 1:
            raise PlanError(f"--{name.replace('_len', '').replace('_', '-')} must be >= 1")
    if not 0 <= args.mtp_acceptance <= 1:
        raise PlanError("--mtp-acceptance must be between 0 and 1")
    quants = None
    if args.quant:
        quants = [q.strip().lower() for q in args.quant.split(",") if q.strip()]
        bad = [q for q in quants if q not in QUANTS]
        if bad:
            raise PlanError(f"unknown quantization {', '.join(bad)}; use {', '.join(QUANTS)}")
    if args.kv_dtype not in KV_BYTES:
        raise PlanError(f"unknown --kv-dtype {args.kv_dtype!r}; use {', '.join(KV_BYTES)}")
    work = Workload(args.input_len, args.output_len, ttft_s=parse_duration(args.ttft, "--ttft"),
                    tpot_s=parse_duration(args.tpot, "--tpot"), mtp_tokens=args.mtp,
                    mtp_acceptance=args.mtp_acceptance, expert_imbalance=args.expert_imbalance,
                    kv_dtype=args.kv_dtype)
    shape = load_shape(args.model)
    catalog = load_catalog(args.catalog)
    calibration = load_calibration(args.calibration)
    chips = resolve_chips(args.chips, catalog, lambda: this_machine(calibration=calibration))
    factor_set = published_fit()

    def factors_of(chip):
        return factors_for(chip, factor_set)

    modes = {"both": ("colocated", "disaggregated"), "all": ("colocated", "disaggregated", "mixed")}.get(
        args.mode, (args.mode,))
    fleet = None
    if args.fleet:
        from shoal.planner.fleet import parse_fleet

        fleet = parse_fleet(args.fleet, [c.key for c in chips])
        if len(fleet) > 1 and "mixed" not in modes:
            modes = (*modes, "mixed")
    split_plans = []
    if "split" in modes or (fleet and len(fleet) > 1):
        if not fleet or len(fleet) < 2:
            raise PlanError("--mode split splits one model over several chip kinds: give them with "
                            "--fleet CHIP:N,CHIP:N (e.g. --fleet h20:8,910b:16)")
        from shoal.planner.split import search_split

        by_key = {c.key: c for c in chips}
        split_plans = search_split(shape, fleet, by_key, work, factors_of,
                                   [q for q in (quants or QUANTS)])
    modes = tuple(m for m in modes if m != "split")
    plans = search(shape, chips, work, factors_of, max_chips=args.max_chips, quants=quants, modes=modes,
                   progress=not args.no_progress and not args.json) if modes else []
    infeasible = {c.key: explain_infeasible(shape, c, work, factors_of(c), args.max_chips, quants)
                  for c in chips if not any(p.chip.key == c.key or p.prefill_kind.key == c.key for p in plans)}
    if not plans and not split_plans:
        raise PlanError("no plan meets the limits. " + " | ".join(infeasible.values()))

    objective = OBJECTIVES[args.objective]
    keys = [c.key for c in chips]
    best = {k: sorted((p for p in plans if p.chip.key == k and p.prefill_chip is None), key=objective,
                      reverse=True)[:args.top] for k in keys}
    mixed = sorted((p for p in plans if p.prefill_chip is not None), key=objective, reverse=True)[:args.top]
    fleet_answer = None
    if fleet:
        from shoal.planner.fleet import best_in_fleet

        fleet_answer = best_in_fleet(plans + split_plans, fleet)
    match_key, match_n = _match_spec(args.match, keys)
    reference = None
    matches = {}
    own = [p for p in plans if p.chip.key == match_key and p.prefill_chip is None
           and math.ceil(p.chips - 1e-9) <= match_n]
    if own:
        reference = max(own, key=lambda p: p.output_tps)
        for key in keys:
            if key != match_key:
                found = chips_to_match(plans, key, reference.output_tps)
                if found:
                    matches[key] = found
    front = sorted(pareto_front(plans), key=objective, reverse=True)

    plot_paths: list[str] = []
    plot_note = None
    if not args.no_plots:
        if have_matplotlib():
            title = (f"{shape.name}, in {work.input_len} / out {work.output_len}"
                     + (f", TPOT <= {work.tpot_s * 1e3:g} ms" if work.tpot_s else "")
                     + (f", TTFT <= {work.ttft_s:g} s" if work.ttft_s else ""))
            ref = (f"{match_n} x {match_key}", reference) if reference else None
            plot_paths = [str(p) for p in write_plots(plans, keys, args.plots, title, ref, matches)]
            if fleet_answer:
                from shoal.planner.plots import write_fleet_plot

                plot_paths.append(str(write_fleet_plot(fleet_answer, fleet, args.plots, title)))
        else:
            plot_note = "plots skipped: matplotlib is not installed (pip install 'shoal[plan]')"

    if args.json:
        print(json.dumps({
            "model": shape.summary(), "workload": vars(work),
            "best": {k: [p.as_dict() for p in v] for k, v in best.items()},
            "pareto_front": [p.as_dict() for p in front],
            "match": None if reference is None else {
                "reference": {"chip": match_key, "chips": match_n, **reference.as_dict()},
                "equivalents": {k: {"chips": n, **p.as_dict()} for k, (n, p) in matches.items()}},
            "infeasible": infeasible, "plots": plot_paths, "plots_note": plot_note,
            "mixed": [p.as_dict() for p in mixed],
            "split": [p.as_dict() for p in sorted(split_plans, key=objective, reverse=True)[:args.top]],
            "fleet": None if fleet_answer is None else {
                "fleet": fleet, "options": {k: o.as_dict() for k, o in fleet_answer.items()}},
        }, indent=2))
        return 0

    s = shape.summary()
    print(f"{s['model']}: {s['total_params_B']:.1f}B parameters, {s['active_params_B']:.1f}B active, {s['attention']}, "
          f"KV {s['kv_bytes_per_token'] / 1024:.1f} KiB/token ({work.kv_dtype})")
    limits = ", ".join(x for x in (f"TTFT <= {work.ttft_s * 1e3:g} ms" if work.ttft_s else "",
                                   f"TPOT <= {work.tpot_s * 1e3:g} ms" if work.tpot_s else "") if x) or "no limits"
    print(f"workload: {work.input_len} in / {work.output_len} out, {limits}; {len(plans)} feasible plans; "
          f"ranked by output tokens/s per {args.objective}")
    for key in keys:
        factors = factors_of(next(c for c in chips if c.key == key))
        compute = (f"matmuls {factors.prefill_compute:g} of peak x rows / (rows + {factors.matmul_half_tokens:g})"
                   if factors.matmul_half_tokens > 0 else
                   f"prefill {factors.prefill_compute:g}, decode {factors.decode_compute:g} of peak")
        print(f"  {key} factors: {compute}, "
              f"experts {factors.expert_efficiency:g} of that, memory {factors.memory:g}, link {factors.link:g}, "
              f"layer overhead {factors.layer_overhead_us:g} us, expert-parallel layer {factors.ep_layer_us:g} us "
              f"(see `shoal plan --validate`)")
    print("")
    rows = [HEADER] + [_plan_row(p) for k in keys for p in best[k]]
    print("best plans per chip:")
    print("\n".join(_table(rows)))
    if mixed:
        print("\nmixed fleets (prefill on one kind, decode on another):")
        print("\n".join(_table([HEADER] + [_plan_row(p) for p in mixed])))
    if split_plans:
        print("\none model split over chip kinds (layers, or a MoE model's experts, by memory bandwidth, as the "
              "engine's --pp-layers auto and --ep-weights auto):")
        print("\n".join(_table([HEADER] + [_plan_row(p) for p in
                                          sorted(split_plans, key=objective, reverse=True)[:args.top]])))
    print("\nPareto front (throughput per chip, per watt, per dollar):")
    print("\n".join(_table([HEADER] + [_plan_row(p) for p in front[:8]])))
    if reference is not None:
        print(f"\n{match_n} x {match_key} at best: {reference.output_tps:,.0f} output tokens/s "
              f"({reference.describe()}), {reference.kwh_per_mtok:.3f} kWh per million output tokens")
        for key, (count, plan) in matches.items():
            replicas = math.ceil(reference.output_tps / plan.output_tps - 1e-9)
            print(f"  matched by {count} x {key}: {replicas} x [{plan.describe()}] = "
                  f"{plan.output_tps * replicas:,.0f} tokens/s, "
                  f"{plan.kwh_per_mtok:.3f} kWh per million output tokens")
    if fleet_answer is not None:
        _print_fleet(fleet, fleet_answer)
    for key, why in infeasible.items():
        print(f"\nno plan for {why}")
    for path in plot_paths:
        print(f"wrote {path}")
    if plot_note:
        print(plot_note)
    return 0


def _print_fleet(fleet: dict[str, int], options: dict) -> None:
    def line(use) -> str:
        chips = " + ".join(f"{n} {k}" for k, n in use.used.items())
        return f"{use.replicas} x [{use.plan.describe()}] on {chips}: {use.output_tps:,.0f} output tokens/s"

    print("\nfleet " + " + ".join(f"{n} x {k}" for k, n in fleet.items()) + ":")
    if not options:
        print("  no plan fits in this fleet")
        return
    for name, option in options.items():
        cost = option.usd_per_mtok
        label = f"best ({option.name})" if name == "best" else name
        print(f"  {label}: {option.output_tps:,.0f} output tokens/s, {option.kwh_per_mtok:.3f} kWh and "
              f"{'-' if cost is None else f'${cost:.2f}'} per million tokens")
        if name != "best":
            for use in option.uses:
                print(f"      {line(use)}")


def _match_spec(text: str | None, keys: list[str]) -> tuple[str, int]:
    if text is None:
        return keys[0], 8
    key, _, count = text.partition(":")
    key = key.strip().lower()
    if key not in keys:
        raise PlanError(f"--match {text!r}: {key!r} is not one of --chips ({', '.join(keys)})")
    try:
        n = int(count) if count else 8
    except ValueError:
        raise PlanError(f"--match takes CHIP:N, e.g. h200:8; got {text!r}") from None
    if n < 1:
        raise PlanError("--match N must be >= 1")
    return key, n
