"""`shoal plan --validate FILE [--json]` on the public JSON case format: every phase and every measured
key predicted with the same keys, the older TOML form, and one-line errors for bad files."""

from __future__ import annotations

import json

import pytest

from shoal.cli import main
from shoal.planner.cases import load_cases
from shoal.planner.catalog import load_catalog
from shoal.planner.cost import Deployment, Layout, decode_step_time, prefill_time
from shoal.planner.shapes import load_shape
from shoal.planner.validate import published_fit

BASE = {"source": "test", "model": "llama-3-8b", "chip": "h100", "chips": 1, "weights": "bf16"}
PREFILL = {**BASE, "name": "p", "phase": "prefill", "input_len": 1024, "batch_per_chip": 8,
           "measured": {"input_tok_s_per_chip": 10000, "ttft_ms": 800}}
DECODE = {**BASE, "name": "d", "phase": "decode", "input_len": 1000, "output_len": 200, "batch_per_chip": 32,
          "measured": {"output_tok_s_per_chip": 1500, "tpot_ms": 20}}
BOTH = {**BASE, "name": "b", "phase": "both", "input_len": 1000, "output_len": 1000, "concurrency": 64,
        "measured": {"output_tok_s_per_chip": 3000, "input_tok_s_per_chip": 3000, "tpot_ms": 20, "ttft_ms": 200}}
DISAGG = {**BASE, "name": "pd", "phase": "both", "chips": 3, "input_len": 2000, "output_len": 500,
          "concurrency": 256, "disaggregated": {"prefill": {"chips": 1}, "decode": {"chips": 2, "tp": 2}},
          "measured": {"output_tok_s_per_chip": 2000, "ttft_ms": 500}}


def run_validate(tmp_path, capsys, cases, *flags):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    rc = main(["plan", "--validate", str(path), *flags])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_json_output_has_measured_and_predicted_with_the_same_keys(tmp_path, capsys):
    rc, out, err = run_validate(tmp_path, capsys, [PREFILL, DECODE, BOTH, DISAGG], "--json")
    assert rc == 0, err
    report = json.loads(out)
    by_name = {c["name"]: c for c in report["cases"]}
    assert set(by_name) == {"p", "d", "b", "pd"}
    for case in (PREFILL, DECODE, BOTH, DISAGG):
        got = by_name[case["name"]]
        assert got["measured"] == {k: float(v) for k, v in case["measured"].items()}
        assert set(got["predicted"]) == set(case["measured"])
        assert all(v > 0 for v in got["predicted"].values())
        assert got["left_out_error"] is None  # holdout by default: only predicted
    assert report["summary"]["holdout"]["n"] == 4


def test_prefill_and_decode_predictions_are_the_cost_models():
    """The figures --validate prints are the cost model's, with the fitted factors of the chip's family."""
    from shoal.planner.predict import predict

    chip = load_catalog()["h100"]
    factors = published_fit()["nvidia"]
    shape = load_shape("llama-3-8b")
    dep = Deployment(chip, Layout(1), quant="bf16")
    prefill = predict(load_cases_from(PREFILL), factors, chip, shape)["predicted"]
    seconds, _ = prefill_time(shape, dep, factors, 8, 1024)
    assert prefill["input_tok_s_per_chip"] == pytest.approx(8 * 1024 / seconds)
    assert prefill["ttft_ms"] == pytest.approx(seconds * 1e3)
    decode = predict(load_cases_from(DECODE), factors, chip, shape)["predicted"]
    step, _ = decode_step_time(shape, dep, factors, 32, 1000 + 200 / 2)  # the mean context over the output
    assert decode["tpot_ms"] == pytest.approx(step * 1e3)
    assert decode["output_tok_s_per_chip"] == pytest.approx(32 / step)


def test_serving_obeys_littles_law_and_the_token_ratio():
    """At a concurrency, users cycle through TTFT then output_len x TPOT: throughput x cycle = users."""
    from shoal.planner.predict import predict

    chip = load_catalog()["h100"]
    factors = published_fit()["nvidia"]
    shape = load_shape("llama-3-8b")
    for spec in (BOTH, DISAGG):
        case = load_cases_from(spec)
        got = predict(case, factors, chip, shape)["predicted"]
        requests_per_s = got["output_tok_s_per_chip"] * case.chips / case.output_len
        decoding = requests_per_s * case.output_len * got["tpot_ms"] / 1e3
        in_prefill = requests_per_s * got["ttft_ms"] / 1e3
        assert decoding + in_prefill == pytest.approx(case.concurrency, rel=0.01)
        assert got["input_tok_s_per_chip"] / got["output_tok_s_per_chip"] == pytest.approx(
            case.input_len / case.output_len)
    # more users: more throughput, each waits longer
    low = predict(load_cases_from({**BOTH, "concurrency": 8}), factors, chip, shape)["predicted"]
    high = predict(load_cases_from({**BOTH, "concurrency": 128}), factors, chip, shape)["predicted"]
    assert high["output_tok_s_per_chip"] > 3 * low["output_tok_s_per_chip"]
    assert high["tpot_ms"] > low["tpot_ms"] and high["ttft_ms"] > low["ttft_ms"]


def test_decode_at_a_tpot_limit_takes_the_largest_batch_within_it():
    from shoal.planner.predict import predict

    chip = load_catalog()["h100"]
    factors = published_fit()["nvidia"]
    shape = load_shape("llama-3-8b")
    spec = {k: v for k, v in DECODE.items() if k != "batch_per_chip"}
    got = predict(load_cases_from({**spec, "tpot_limit_ms": 15}), factors, chip, shape)
    seqs = float(got["load"].split()[0])
    dep = Deployment(chip, Layout(1), quant="bf16")
    assert decode_step_time(shape, dep, factors, int(seqs), 1100)[0] <= 0.015
    assert decode_step_time(shape, dep, factors, int(seqs) + 1, 1100)[0] > 0.015


def load_cases_from(spec):
    from shoal.planner.cases import parse_case

    return parse_case(spec, "test")


def test_text_output_lists_every_measured_key(tmp_path, capsys):
    rc, out, err = run_validate(tmp_path, capsys, [PREFILL, DECODE, BOTH])
    assert rc == 0, err
    for label in ("in/chip*", "TTFT", "out/chip*", "TPOT"):
        assert label in out
    assert "held out (never fitted): 3 cases" in out


def test_the_older_toml_form_still_reads(tmp_path, capsys):
    path = tmp_path / "old.toml"
    path.write_text('[[case]]\nid = "old"\nrole = "holdout"\nphase = "decode"\nmodel = "llama-3-8b"\n'
                    'chip = "h100"\nchips = 1\ncontext = 1000\nbatch_per_chip = 16\npublished = 8000\nper_chips = 8\n'
                    'published_text = "x"\nsource = "s"\nassumptions = "a"\n')
    case = load_cases(path)[0]
    assert (case.name, case.input_len, case.batch_per_chip, case.measured) == \
        ("old", 1000, 16, {"output_tok_s_per_chip": 1000.0})
    assert main(["plan", "--deployments", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cases"][0]["name"] == "old"


@pytest.mark.parametrize("change, message", [
    ({"chip": "h999"}, "case 'd': unknown chip 'h999'"),
    ({"measured": None}, "case 'd': missing field 'measured'"),
    ({"input_len": None}, "case 'd': missing field 'input_len'"),
    ({"tp": 3, "chips": 3}, "case 'd': tp=3 does not divide the model's 32 attention heads"),
    ({"ep": 2, "chips": 2}, "case 'd': ep=2: llama-3-8b has no routed experts"),
    ({"dp": 2}, "case 'd': chips=1 is not tp x pp x dp = 1 x 1 x 2"),
    ({"model": "llama-9"}, "case 'd': no model config at llama-9"),
    ({"weights": "fp3"}, "case 'd': unknown quantization 'fp3'"),
    ({"phase": "train"}, "phase must be one of prefill, decode, both"),
    ({"measured": {"ttft_ms": 5}}, "measured 'ttft_ms' cannot be predicted for phase decode"),
    ({"concurrency": 4}, "give exactly one of"),
    ({"batch_per_chip": None}, "give exactly one of batch_per_chip, concurrency, tpot_limit_ms (got none)"),
    ({"tokens_per_chip": 100, "batch_per_chip": None}, "tokens_per_chip does not apply to phase decode"),
    ({"chips": 0}, "chips must be >= 1"),
    ({"measured": {"tpot_ms": -1}}, "measured tpot_ms must be a positive number"),
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"chips": 1, "model": "deepseek-v3"}, "the weights do not fit"),
])
def test_bad_cases_get_one_line_errors(tmp_path, capsys, change, message):
    spec = {k: v for k, v in {**DECODE, **change}.items() if v is not None}
    rc, out, err = run_validate(tmp_path, capsys, [spec])
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"), ("{}", "must hold a JSON list of cases"), ("[3]", "must be a JSON object"),
])
def test_bad_files_get_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert main(["plan", "--validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert main(["plan", "--validate", str(tmp_path / "none.json")]) == 2
    assert "no cases file at" in capsys.readouterr().err


def test_a_mixed_fleet_prefills_on_one_kind_and_decodes_on_another(tmp_path, capsys):
    """disaggregated.prefill.chip puts the prefill instance on another chip kind, with its own
    family's factors: a faster prefill chip shortens TTFT for the same decode instance."""
    from shoal.planner.predict import deployments_for
    from shoal.planner.validate import predict_with

    catalog = load_catalog()
    mixed = {**DISAGG, "name": "mixed", "chip": "910b", "weights": "int8", "measured": {"ttft_ms": 500},
             "disaggregated": {"prefill": {"chips": 1, "chip": "h100"}, "decode": {"chips": 2, "tp": 2}}}
    case = load_cases_from(mixed)
    assert case.prefill_chip == "h100"
    prefill_dep, decode_dep = deployments_for(case, catalog["910b"], catalog["h100"])
    assert (prefill_dep.chip.key, decode_dep.chip.key) == ("h100", "910b")
    slow = predict_with(case, published_fit(), catalog)["predicted"]
    faster = load_cases_from({**mixed, "disaggregated": {"prefill": {"chips": 1, "chip": "b200"},
                                                         "decode": {"chips": 2, "tp": 2}}})
    fast = predict_with(faster, published_fit(), catalog)["predicted"]
    assert fast["ttft_ms"] < slow["ttft_ms"] and fast["output_tok_s_per_chip"] >= slow["output_tok_s_per_chip"]
    bad = {**mixed, "disaggregated": {"prefill": {"chips": 1, "chip": "h999"}, "decode": {"chips": 2, "tp": 2}}}
    rc, out, err = run_validate(tmp_path, capsys, [bad])
    assert rc == 2 and "case 'mixed': unknown chip 'h999'" in err


def test_a_limit_no_batch_meets_prints_null_not_infinity(tmp_path, capsys):
    spec = {**{k: v for k, v in DECODE.items() if k != "batch_per_chip"}, "tpot_limit_ms": 0.5}
    rc, out, err = run_validate(tmp_path, capsys, [spec], "--json")
    assert rc == 0, err
    case = json.loads(out)["cases"][0]
    assert case["predicted"] == {"output_tok_s_per_chip": 0.0, "tpot_ms": None}
    assert case["error"]["output_tok_s_per_chip"] == -1.0


def test_kv_free_fraction_is_a_share_of_the_memory_the_weights_leave():
    from shoal.planner.cost import weights_per_chip
    from shoal.planner.predict import deployments_for

    shape = load_shape("llama-3.3-70b")
    h200 = load_catalog()["h200"]
    case = load_cases_from({**BOTH, "model": "llama-3.3-70b", "chip": "h200", "weights": "fp8",
                            "kv_free_fraction": 0.5})
    dep = deployments_for(case, h200, shape=shape)[0]
    weights = weights_per_chip(shape, dep)
    assert dep.memory_util * 141e9 == pytest.approx(weights + 0.5 * (141e9 - weights))
    with pytest.raises(Exception, match="memory_util or kv_free_fraction, not both"):
        load_cases_from({**BOTH, "kv_free_fraction": 0.5, "memory_util": 0.9})
