"""PNG plots of a plan: throughput against chip count per chip kind (with the equivalence line) and
energy per million output tokens. matplotlib is optional (`pip install shoal[plan]`)."""

from __future__ import annotations

from pathlib import Path

from shoal.planner.search import Plan, best_by_chip_count


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(plans: list[Plan], chip_keys: list[str], out_prefix: str | Path, title: str,
                reference: tuple[str, Plan] | None = None,
                matches: dict[str, tuple[int, Plan]] | None = None) -> list[Path]:
    """Write <prefix>_throughput.png and <prefix>_energy.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    for key in chip_keys:
        curve = best_by_chip_count(plans, key)
        if curve:
            ax.step([p.chips for p in curve], [p.output_tps for p in curve], where="post", marker="o", ms=3, label=key)
    if reference is not None:
        label, plan = reference
        ax.axhline(plan.output_tps, color="grey", ls="--", lw=1)
        ax.annotate(f"{label}: {plan.output_tps:,.0f} tok/s", (1, plan.output_tps), fontsize=8, color="grey",
                    xytext=(2, 3), textcoords="offset points")
        for key, (count, _) in (matches or {}).items():
            ax.axvline(count, color="grey", ls=":", lw=1)
            ax.annotate(f"{count} x {key}", (count, plan.output_tps), fontsize=8, rotation=90,
                        xytext=(2, -60), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("chips (decode + prefill share)")
    ax.set_ylabel("output tokens/s (best layout)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "_throughput.png"))
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    for key in chip_keys:
        curve = best_by_chip_count(plans, key)
        if curve:
            ax.plot([p.chips for p in curve], [p.kwh_per_mtok for p in curve], marker="o", ms=3, label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chips (decode + prefill share)")
    ax.set_ylabel("kWh per million output tokens")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "_energy.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def write_fleet_plot(options: dict, fleet: dict[str, int], out_prefix: str | Path, title: str) -> Path:
    """Write <prefix>_fleet.png: output tokens/s of each way to use the fleet, with its energy and
    cost per million tokens on the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(f"{out_prefix}_fleet.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [n for n in options if n != "best"]
    best = options["best"].name
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.4), dpi=90)
    values = [options[n].output_tps for n in names]
    ax.barh(names, values, color=["tab:green" if n == best else "tab:blue" for n in names])
    for i, name in enumerate(names):
        cost = options[name].usd_per_mtok
        ax.annotate(f" {values[i]:,.0f} tok/s, {options[name].kwh_per_mtok:.2f} kWh"
                    + ("" if cost is None else f", ${cost:.2f}") + " /Mtok", (values[i], i), va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.6)
    ax.set_xlabel("output tokens/s")
    ax.set_title(f"{title}\n" + " + ".join(f"{n} x {k}" for k, n in fleet.items()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
