"""`shoal plan` end to end (small searches), the catalog, calibration's fit with an injected
measurement, and the bad-input messages."""

from __future__ import annotations

import json

import pytest

from shoal.cli import main
from shoal.planner.calibrate import Run, calibrate, predict_run
from shoal.planner.catalog import Chip, load_catalog, resolve_chips
from shoal.planner.cost import Factors
from shoal.planner.errors import PlanError
from shoal.planner.shapes import load_shape


def test_catalog_entries_have_sources_and_kinds():
    catalog = load_catalog()
    for key in ("a100", "h100", "h800", "h200", "h20", "b200", "gb200", "910b", "910c", "cm384", "xeon"):
        chip = catalog[key]
        for figure in ("bf16_tflops", "memory_gb", "memory_bw_gbps", "power_w"):
            kind, source = chip.sources[figure]
            assert kind in ("official", "estimate") and source
    assert catalog["gb200"].scaleup_domain == 72 and catalog["cm384"].scaleup_domain == 384


def test_user_catalog_and_unknown_chip(tmp_path):
    extra = tmp_path / "mine.toml"
    figure = '{ value = %s, kind = "estimate", source = "mine" }'
    fields = dict(bf16_tflops=100, memory_gb=48, memory_bw_gbps=900, scaleup_gbps=50, scaleup_domain=4,
                  scaleout_gbps=25, power_w=300)
    extra.write_text("[chips.mychip]\n" + "".join(f"{k} = {figure % v}\n" for k, v in fields.items()))
    catalog = load_catalog([extra])
    assert resolve_chips("mychip", catalog)[0].memory_gb == 48
    with pytest.raises(PlanError, match="unknown chip 'z9000'.*--catalog"):
        resolve_chips("h200,z9000", catalog)
    extra.write_text("[chips.bad]\nbf16_tflops = 5\n")
    with pytest.raises(PlanError, match="bf16_tflops must be"):
        load_catalog([extra])


def test_plan_prints_table_json_and_equivalence(capsys, tmp_path):
    rc = main(["plan", "--model", "deepseek-v3", "--chips", "h200,910c", "--tpot", "50ms", "--ttft", "2s",
               "--quant", "fp8,int8", "--max-chips", "8", "--json", "--no-plots"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["best"]["h200"] and out["best"]["910c"]
    for plan in out["best"]["h200"]:
        assert plan["tpot_ms"] <= 50 + 1e-6 and plan["ttft_ms"] <= 2000 + 1e-6
    assert out["match"]["reference"]["chip"] == "h200"
    assert out["match"]["equivalents"]["910c"]["chips"] >= 1


def test_plan_writes_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    prefix = tmp_path / "p"
    rc = main(["plan", "--model", "llama-3-8b", "--chips", "h100,910b", "--tpot", "50ms", "--max-chips", "2",
               "--quant", "bf16", "--mode", "colocated", "--plots", str(prefix), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "p_throughput.png").stat().st_size > 1000 and (tmp_path / "p_energy.png").is_file()
    assert "best plans per chip" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--chips", "h999"], "unknown chip 'h999'"),
    (["--tpot", "50"], "--tpot takes a duration with its unit"),
    (["--tpot", "0.1ms", "--max-chips", "8", "--quant", "fp8"], "TPOT limit 0.1 ms binds"),
    (["--ttft", "1ms", "--max-chips", "8", "--quant", "fp8"], "TTFT limit 1 ms binds"),
    (["--quant", "fp3"], "unknown quantization fp3"),
])
def test_bad_input_gets_one_clear_line(argv, message, capsys):
    rc = main(["plan", "--model", "deepseek-v3", "--chips", "h200", "--no-plots", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_unparseable_config_is_reported(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["plan", "--model", str(tmp_path), "--no-plots"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_calibration_fit_recovers_injected_factors(tmp_path):
    """Measurements made by the cost model itself with known factors: the fit must find them again
    and predict the held-back shape."""
    chip = Chip(key="this", name="fake", bf16_tflops=2.0, memory_gb=16, memory_bw_gbps=20.0, scaleup_gbps=1.0,
                scaleup_domain=1, scaleout_gbps=1.0, power_w=100.0, family="this")
    truth = Factors(prefill_compute=0.4, decode_compute=0.3, memory=0.8, overlap=0.0, layer_overhead_us=300.0,
                    step_overhead_us=2000.0)
    runs = [Run("a", "llama-3-8b", 2, 64, 4, 8), Run("b", "deepseek-v3", 1, 32, 2, 8),
            Run("c", "llama-3-70b", 1, 128, 8, 8), Run("held", "llama-3-8b", 4, 128, 16, 8, held_back=True)]

    def measure(folder, run, device):
        return predict_run(load_shape(folder), chip, truth, run)

    report = calibrate(path=tmp_path / "cal.json", progress=False, runs=runs, measure=measure, chip=chip)
    held = [r for r in report["rows"] if r["held_back"]]
    assert held and all(abs(r["error"]) < 0.05 for r in held)
    assert json.loads((tmp_path / "cal.json").read_text())["factors"]


def test_interleaved_measurement_takes_turns_and_keeps_each_shapes_best_trial():
    from shoal.planner.calibrate import measure_interleaved

    order = []

    class FakeProbe:
        def __init__(self, name, prefills, decodes):
            self.name, self.prefills, self.decodes = name, iter(prefills), iter(decodes)

        def prefill_trial(self):
            order.append(("prefill", self.name))
            return next(self.prefills)

        def decode_trial(self, tokens=None):
            order.append(("decode", self.name))
            return next(self.decodes)

    # the first trial of each kind is the warm-up and does not count
    a = FakeProbe("a", [9.0, 3.0, 2.0, 5.0], [9.0, 0.5, 0.4, 0.6])
    b = FakeProbe("b", [9.0, 7.0, 8.0, 6.0], [9.0, 0.9, 0.7, 0.8])
    got = measure_interleaved([a, b], rounds=3, budget_s=0.0)
    assert [(g["prefill_s"], g["decode_step_s"]) for g in got] == [(2.0, 0.4), (6.0, 0.7)]
    assert order[4:8] == [("prefill", "a"), ("prefill", "b"), ("decode", "a"), ("decode", "b")]
