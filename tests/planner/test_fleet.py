"""Mixed fleets: prefill on one chip kind and decode on another, energy and cost charged per kind,
and `--fleet` answering "what is the best use of these chips, and is it better than each kind alone?"."""

from __future__ import annotations

import json

import pytest

from shoal.cli import main
from shoal.planner.catalog import load_catalog
from shoal.planner.cost import Layout
from shoal.planner.errors import PlanError
from shoal.planner.fleet import best_in_fleet, chips_for, most_replicas, parse_fleet
from shoal.planner.search import Plan


def plan(chip, chips, output_tps, prefill_chip=None, prefill_chips=0.0, prefill_size=2):
    catalog = load_catalog()
    return Plan(catalog[chip], "int8", "mixed" if prefill_chip else "colocated", Layout(chips, tp=chips),
                Layout(prefill_size, tp=prefill_size) if prefill_chips else None, 10, chips + prefill_chips, 1.0,
                0.05, output_tps, prefill_chips, prefill_chip=catalog[prefill_chip] if prefill_chip else None)


def test_a_mixed_plan_charges_each_kind_its_own_power_and_price():
    mixed = plan("h20", 8, 1000.0, prefill_chip="910b", prefill_chips=3.0)
    catalog = load_catalog()
    h20, ascend = catalog["h20"], catalog["910b"]
    assert mixed.watts == pytest.approx(8 * h20.energy_power_w + 3 * ascend.energy_power_w)
    per_hour = 8 * h20.price_per_hour + 3 * ascend.price_per_hour
    assert mixed.usd_per_mtok == pytest.approx(per_hour / (1000.0 * 3600) * 1e6)
    assert "prefill chips of 910b" in mixed.describe()


def test_replicas_fill_the_fleet_with_whole_prefill_instances():
    mixed = plan("h20", 4, 1000.0, prefill_chip="910b", prefill_chips=1.5, prefill_size=2)
    # 2 copies: 8 h20 and 3 prefill chips' worth of work, rounded up to two 2-chip prefill instances
    assert chips_for(mixed, 2) == {"h20": 8, "910b": 4}
    use = most_replicas(mixed, {"h20": 8, "910b": 16})
    assert (use.replicas, use.output_tps) == (2, 2000.0)
    assert most_replicas(mixed, {"h20": 8}) is None  # no 910b to prefill on


def test_the_fleet_answer_compares_one_plan_each_kind_alone_and_side_by_side():
    plans = [plan("h20", 4, 500.0), plan("910b", 8, 1500.0), plan("h20", 8, 2600.0, "910b", 6.0, 2)]
    options = best_in_fleet(plans, {"h20": 8, "910b": 16})
    assert options["h20 alone"].output_tps == 1000.0  # two copies of the 4-chip plan
    assert options["910b alone"].output_tps == 3000.0
    assert options["side by side"].output_tps == 4000.0
    assert options["one plan"].output_tps == 3000.0  # the 910b plan twice beats the mixed plan once
    assert most_replicas(plans[2], {"h20": 8, "910b": 16}).replicas == 1  # 8 h20 + 6 910b
    # the mixed plan leaves 10 910b: one copy of the 8-chip 910b plan serves on them, and that is best
    assert options["mixed + the rest"].output_tps == 2600.0 + 1500.0
    assert options["best"].name == "mixed + the rest"
    # a better mixed plan wins over both kinds alone
    options = best_in_fleet([*plans, plan("h20", 8, 4500.0, "910b", 6.0, 2)], {"h20": 8, "910b": 16})
    assert options["best"].output_tps == 4500.0 + 1500.0 and options["best"].uses[0].plan.prefill_chip.key == "910b"
    with pytest.raises(PlanError, match="'a100' is not one of --chips"):
        parse_fleet("h20:8,a100:2", ["h20", "910b"])


def test_plan_fleet_prints_and_returns_the_options(capsys):
    rc = main(["plan", "--model", "llama-3.3-70b", "--chips", "h20,910b", "--fleet", "h20:8,910b:16",
               "--tpot", "50ms", "--ttft", "2s", "--in", "2048", "--out", "512", "--max-chips", "8",
               "--quant", "int8", "--no-plots", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    options = out["fleet"]["options"]
    assert {"best", "h20 alone", "910b alone", "side by side"} <= set(options)
    assert options["best"]["output_tokens_per_s"] == max(o["output_tokens_per_s"] for o in options.values())
    assert out["mixed"] and all(p["prefill_chip"] != p["chip"] for p in out["mixed"])
    for use in options["side by side"]["uses"]:
        assert sum(use["chips_used"].values()) <= 16


def test_plan_fleet_writes_its_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    prefix = tmp_path / "f"
    rc = main(["plan", "--model", "llama-3.3-70b", "--chips", "h20,910b", "--fleet", "h20:8,910b:16",
               "--tpot", "50ms", "--in", "2048", "--out", "512", "--max-chips", "8", "--quant", "int8",
               "--plots", str(prefix), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "f_fleet.png").stat().st_size > 1000
    assert "best (" in capsys.readouterr().out
