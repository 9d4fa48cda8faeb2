"""One model split over unequal chips (split.py), and the mechanisms the roofline alone misses: the
busiest attention data-parallel group in a chunked step, grouped-query KV read per query head, the
attention kernels' own efficiency, and calibration's serving check."""

from __future__ import annotations

import dataclasses

import pytest

from shoal.cli import main
from shoal.planner.calibrate import Run, calibrate, predict_run
from shoal.planner.cases import parse_case
from shoal.planner.catalog import Chip, load_catalog
from shoal.planner.cost import Deployment, Factors, Layout, decode_step_time, forward_cost
from shoal.planner.errors import PlanError
from shoal.planner.fleet import best_in_fleet, chips_for
from shoal.planner.search import Workload
from shoal.planner.shapes import load_shape
from shoal.planner.split import evaluate_split, split_layers, stage_shape


def chip(**kw) -> Chip:
    base = dict(key="t", name="test chip", bf16_tflops=100.0, fp8_tflops=200.0, memory_gb=80.0, memory_bw_gbps=1000.0,
                scaleup_gbps=100.0, scaleup_domain=8, scaleout_gbps=10.0, power_w=500.0, price_per_hour=2.0)
    base.update(kw)
    return Chip(**base)


def test_layers_are_split_by_memory_bandwidth_as_the_engine_splits_them():
    catalog = load_catalog()
    shape = load_shape("llama-3.3-70b")
    # H20 4.0 TB/s, 910B 1.6 TB/s: 80 layers in parts 4000:1600 (the engine's proportional_split)
    assert split_layers(shape, [catalog["h20"], catalog["910b"]]) == [57, 23]
    assert split_layers(shape, [catalog["h20"], catalog["910b"], catalog["910b"]]) == [44, 18, 18]
    ds = load_shape("deepseek-v3")
    first, rest = stage_shape(ds, 2, 0), stage_shape(ds, 59, 2)
    assert (first.dense_layers, first.moe_layers, rest.dense_layers, rest.moe_layers) == (2, 0, 1, 58)


def test_a_split_plan_charges_each_stage_and_is_slower_than_its_fast_part_alone():
    catalog = load_catalog()
    fast, slow = catalog["h20"], catalog["910b"]
    shape = load_shape("llama-3.3-70b")
    work = Workload(1024, 256, tpot_s=0.2)
    factors = Factors(prefill_compute=0.4, memory=0.8, link=0.8)
    plan = evaluate_split(shape, [fast, slow], 4, "int8", work, lambda c: factors)
    assert plan is not None and [s.layers for s in plan.stages] == [57, 23]
    assert plan.watts == pytest.approx(4 * fast.energy_power_w + 4 * slow.energy_power_w)
    per_hour = 4 * fast.price_per_hour + 4 * slow.price_per_hour
    assert plan.usd_per_mtok == pytest.approx(per_hour / (plan.output_tps * 3600) * 1e6)
    assert chips_for(plan, 2) == {"h20": 8, "910b": 8}
    assert plan.tpot_s <= 0.2
    assert "57 layers" in plan.describe() and plan.as_dict()["chips_by_kind"] == {"h20": 4, "910b": 4}
    # the fleet answer lists it beside the other options, with the chips it leaves
    option = best_in_fleet([plan], {"h20": 8, "910b": 12})["split + the rest"]
    assert option.uses[0].replicas == 2 and option.output_tps == pytest.approx(2 * plan.output_tps)


def test_split_mode_needs_a_fleet(capsys):
    code = main(["plan", "--model", "llama-3.1-8b", "--chips", "h20,910b", "--mode", "split", "--no-plots",
                 "--no-progress"])
    assert code != 0
    err = capsys.readouterr().err
    assert "--fleet CHIP:N,CHIP:N" in err and len(err.strip().splitlines()) == 1


def test_the_busiest_attention_group_carries_a_whole_prompt_chunk():
    """With attention data-parallel groups a prompt's chunk runs on one of them: the step's attention is
    timed for that group, not for the mean; with one group nothing changes."""
    s = load_shape("deepseek-v3")
    f = Factors(prefill_compute=0.5)
    dep = Deployment(chip(memory_bw_gbps=1e9), Layout(8, tp=1, ep=8), quant="bf16", overlap=False)
    args = dict(tokens=8 * 100 + 512, keys=8 * 100 * 1000 + 512 * 256, kv_read_tokens=0, logits_tokens=0,
                phase="mixed", prefill_tokens=512, prefill_keys=512 * 256)
    mean = forward_cost(s, dep, f, **args)
    busiest = forward_cost(s, dep, f, **args, prefill_chunk=512)
    # the busiest group: its 100 decoders plus the whole 512-token chunk, against 100 + 512 / 8
    ratio = busiest.pieces["attention projections"] / mean.pieces["attention projections"]
    assert ratio == pytest.approx((100 + 512) / (100 + 64))
    assert busiest.pieces["routed experts"] == pytest.approx(mean.pieces["routed experts"])
    one = Deployment(dep.chip, Layout(1), quant="bf16", overlap=False)
    assert forward_cost(s, one, f, **args, prefill_chunk=512).pieces == forward_cost(s, one, f, **args).pieces


def test_kv_read_per_query_head_multiplies_the_cache_bytes_by_the_group():
    s = load_shape("llama-2-70b")  # 64 query heads over 8 KV heads
    base = Deployment(chip(bf16_tflops=1e9, fp8_tflops=2e9), Layout(1), quant="fp8", kv_dtype="fp8")
    old = dataclasses.replace(base, kv_reads="per_query_head")
    f = Factors(memory=1.0)
    a = decode_step_time(s, base, f, 64, 1000)[1].pieces["attention core"]
    b = decode_step_time(s, old, f, 64, 1000)[1].pieces["attention core"]
    assert b == pytest.approx(8 * a)
    mha = load_shape("llama-2-13b")  # as many KV heads as query heads: the same either way
    assert decode_step_time(mha, dataclasses.replace(old, layout=Layout(1)), f, 8, 100)[0] == \
        pytest.approx(decode_step_time(mha, base, f, 8, 100)[0])
    entry = {"name": "x", "source": "s", "model": "llama-2-70b", "chip": "h200", "chips": 1, "phase": "decode",
             "input_len": 128, "output_len": 128, "batch_per_chip": 8, "measured": {"output_tok_s_per_chip": 10},
             "kv_reads": "per-head"}
    with pytest.raises(PlanError, match="kv_reads must be one of per_kv_head, per_query_head"):
        parse_case(entry)


def test_attention_has_its_own_efficiency_when_given():
    s = load_shape("llama-3.1-8b")
    dep = Deployment(chip(memory_bw_gbps=1e9), Layout(1), quant="bf16", overlap=False)
    plain = forward_cost(s, dep, Factors(prefill_compute=0.5), 4096, 4096 * 2048, 0, 1, "prefill")
    own = forward_cost(s, dep, Factors(prefill_compute=0.5, attention_compute=0.25), 4096, 4096 * 2048, 0, 1, "prefill")
    assert own.pieces["attention core"] == pytest.approx(2 * plain.pieces["attention core"])
    assert own.pieces["dense MLP"] == pytest.approx(plain.pieces["dense MLP"])


def test_calibration_checks_serving_on_the_held_back_shape(tmp_path):
    """A held-back run with `serving` gets a row for its closed-loop serving throughput, predicted by
    serving.colocated with the factors fitted on the other runs."""
    from shoal.planner.cost import Layout as L
    from shoal.planner.serving import colocated

    fake = Chip(key="this", name="fake", bf16_tflops=2.0, memory_gb=64, memory_bw_gbps=20.0, scaleup_gbps=1.0,
                scaleup_domain=1, scaleout_gbps=1.0, power_w=100.0, family="this")
    truth = Factors(prefill_compute=0.4, decode_compute=0.3, memory=0.8, overlap=0.0, layer_overhead_us=300.0,
                    step_overhead_us=2000.0)
    runs = [Run("a", "llama-3-8b", 2, 64, 4, 8), Run("b", "deepseek-v3", 1, 32, 2, 8),
            Run("c", "llama-3-70b", 1, 128, 8, 8),
            Run("held", "llama-3-8b", 4, 128, 16, 8, held_back=True, serving=32, serving_tokens=16)]

    def measure(folder, run, device):
        got = predict_run(load_shape(folder), fake, truth, run)
        if run.serving:
            dep = Deployment(fake, L(1), quant="bf16", kv_dtype="bf16", overlap=False)
            got["serving_tps"] = colocated(load_shape(folder), dep, truth, run.serving, run.prompt_len,
                                           run.serving_tokens, chunk_tokens=2048).output_tps
            got["chunk_tokens"] = 2048
        return got

    report = calibrate(path=tmp_path / "cal.json", progress=False, runs=runs, measure=measure, chip=fake)
    serving = [r for r in report["rows"] if r["metric"].startswith("serving")]
    assert len(serving) == 1 and serving[0]["held_back"] and abs(serving[0]["error"]) < 0.05
