"""`shoal plan --fleet h20:8,910b:16`: the best use of the chips one has — replicas of one plan that fit
in the fleet, over every plan the search found (one chip kind, or prefill on one kind and decode on
another) — against each kind alone."""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.planner.errors import PlanError
from shoal.planner.search import Plan


@dataclass
class FleetUse:
    """`replicas` copies of `plan` inside the fleet, and the chips of each kind they take."""

    plan: Plan
    replicas: int
    used: dict[str, int]

    @property
    def output_tps(self) -> float:
        return self.replicas * self.plan.output_tps

    def as_dict(self) -> dict:
        return {"replicas": self.replicas, "chips_used": self.used, "output_tokens_per_s": self.output_tps,
                "kwh_per_million_tokens": self.plan.kwh_per_mtok, "usd_per_million_tokens": self.plan.usd_per_mtok,
                "plan": self.plan.as_dict()}


def parse_fleet(text: str, keys: list[str]) -> dict[str, int]:
    """'h20:8,910b:16' -> {'h20': 8, '910b': 16}; every kind must be one of --chips."""
    fleet: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, _, count = part.partition(":")
        key = key.strip().lower()
        if key not in keys:
            raise PlanError(f"--fleet {text!r}: {key!r} is not one of --chips ({', '.join(keys)})")
        try:
            fleet[key] = int(count)
        except ValueError:
            raise PlanError(f"--fleet takes CHIP:N,CHIP:N, e.g. h20:8,910b:16; got {text!r}") from None
        if fleet[key] < 1:
            raise PlanError("--fleet counts must be >= 1")
    if not fleet:
        raise PlanError("--fleet names no chips; e.g. --fleet h20:8,910b:16")
    return fleet


def chips_for(plan: Plan, replicas: int) -> dict[str, int]:
    """Whole chips of each kind `replicas` copies take: decode instances, and prefill instances
    (shared between decode instances) rounded up to whole prefill instances; a split plan's stages."""
    kinds = getattr(plan, "kinds", None)  # a SplitPlan: one instance over several kinds
    if kinds is not None:
        return {key: replicas * n for key, n in kinds.items()}
    used = {plan.chip.key: replicas * plan.layout.chips}
    if plan.prefill_layout is not None and plan.prefill_chips > 0:
        size = plan.prefill_layout.chips
        prefill = math.ceil(replicas * plan.prefill_chips / size - 1e-9) * size
        used[plan.prefill_kind.key] = used.get(plan.prefill_kind.key, 0) + prefill
    return used


def most_replicas(plan: Plan, fleet: dict[str, int]) -> FleetUse | None:
    """The most copies of `plan` the fleet holds (None if not even one)."""
    if any(key not in fleet for key in chips_for(plan, 1)):
        return None
    replicas = 0
    while all(n <= fleet[k] for k, n in chips_for(plan, replicas + 1).items()):
        replicas += 1
    return FleetUse(plan, replicas, chips_for(plan, replicas)) if replicas else None


@dataclass
class FleetOption:
    """One way to use the fleet: one or more plans, each replicated."""

    name: str
    uses: list[FleetUse]

    @property
    def output_tps(self) -> float:
        return sum(u.output_tps for u in self.uses)

    @property
    def kwh_per_mtok(self) -> float:
        watts = sum(u.replicas * u.plan.watts for u in self.uses)
        return watts / self.output_tps * 1e6 / 3.6e6

    @property
    def usd_per_mtok(self) -> float | None:
        costs = [u.plan.usd_per_mtok for u in self.uses]
        if any(c is None for c in costs):
            return None
        return sum(c * u.output_tps for c, u in zip(costs, self.uses)) / self.output_tps

    def as_dict(self) -> dict:
        return {"option": self.name, "output_tokens_per_s": self.output_tps, "kwh_per_million_tokens": self.kwh_per_mtok,
                "usd_per_million_tokens": self.usd_per_mtok, "uses": [u.as_dict() for u in self.uses]}


def best_in_fleet(plans: list[Plan], fleet: dict[str, int]) -> dict[str, FleetOption]:
    """The options, best first: "best" (the highest throughput of all below), "one plan" (the best
    single plan replicated, a mixed one included), each kind "alone", every kind "side by side" (each
    its own best, on its own chips), and "mixed + the rest" (a plan over several kinds, the chips it
    leaves serving each kind's best plan), and "split + the rest" (one model split over several kinds,
    split.py, likewise)."""
    uses = [u for u in (most_replicas(p, fleet) for p in plans) if u is not None]
    options: dict[str, FleetOption] = {}
    if uses:
        options["one plan"] = FleetOption("one plan", [max(uses, key=lambda u: u.output_tps)])
    for key in fleet:
        own = [u for u in uses if set(u.used) == {key}]
        if own:
            options[f"{key} alone"] = FleetOption(f"{key} alone", [max(own, key=lambda u: u.output_tps)])
    alone = [o.uses[0] for name, o in options.items() if name.endswith(" alone")]
    if len(alone) > 1:
        options["side by side"] = FleetOption("side by side", alone)
    # a plan over several kinds (a mixed one), with the chips it leaves serving on their own
    filled = [_with_the_rest(u, plans, fleet) for u in sorted(uses, key=lambda u: -u.output_tps)[:20]
              if len(u.used) > 1 and not hasattr(u.plan, "kinds")]
    if filled:
        options["mixed + the rest"] = max(filled, key=lambda o: o.output_tps)
    # one model split over several kinds (split.py), the chips it leaves serving on their own
    split = [_with_the_rest(u, plans, fleet, "split + the rest")
             for u in sorted(uses, key=lambda u: -u.output_tps) if hasattr(u.plan, "kinds")][:20]
    if split:
        options["split + the rest"] = max(split, key=lambda o: o.output_tps)
    if options:
        options = {"best": max(options.values(), key=lambda o: o.output_tps), **options}
    return options


def _with_the_rest(use: FleetUse, plans: list[Plan], fleet: dict[str, int],
                   name: str = "mixed + the rest") -> FleetOption:
    uses = [use]
    for key, total in fleet.items():
        left = total - use.used.get(key, 0)
        if left <= 0:
            continue
        own = [u for u in (most_replicas(p, {key: left}) for p in plans) if u is not None]
        if own:
            uses.append(max(own, key=lambda u: u.output_tps))
    return FleetOption(name, uses)
