"""One model split over unequal chips (split.py: layers and experts by speed), and the mechanisms the
roofline alone misses: the busiest attention data-parallel group in a chunked step, grouped-query KV
read per query head, the attention kernels' own efficiency, and calibration's serving check and its
native dtype."""

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
from shoal.planner.split import evaluate_expert_split, evaluate_split, expert_shares, split_layers, stage_shape


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


def test_experts_are_split_by_memory_bandwidth_as_the_engine_splits_them():
    from shoal.parallel.config import ParallelConfig
    from shoal.parallel.split import expert_split

    catalog = load_catalog()
    shape = load_shape("qwen3-235b-a22b")
    counts = [(catalog["h20"], 8), (catalog["910b"], 8)]
    # the engine's --ep-weights auto on the same ranks' bandwidths: 128 experts in parts 4000:1600
    engine = expert_split(128, ParallelConfig(tp=16, ep=16, ep_weights="auto"),
                          [catalog["h20"].memory_bw_gbps] * 8 + [catalog["910b"].memory_bw_gbps] * 8)
    assert expert_shares(shape, counts) == [max(engine[:8]), max(engine[8:])] == [11, 5]


def test_a_chip_holding_fewer_experts_reads_and_computes_fewer():
    shape = load_shape("qwen3-30b-a3b")
    slow = chip(memory_bw_gbps=1600.0)
    factors = Factors(prefill_compute=0.5, memory=0.8)
    even = Deployment(slow, Layout(8, tp=8, ep=8), quant="int8")
    light = dataclasses.replace(even, expert_share=0.5)
    for tokens in (16, 8192):  # memory-bound decode, compute-bound prefill
        a = forward_cost(shape, even, factors, tokens, tokens * 512, tokens * 512, tokens, "decode")
        b = forward_cost(shape, light, factors, tokens, tokens * 512, tokens * 512, tokens, "decode")
        assert b.pieces["routed experts"] == pytest.approx(a.pieces["routed experts"] / 2)
        assert b.pieces["attention core"] == pytest.approx(a.pieces["attention core"])


def test_an_expert_split_runs_its_chips_in_lockstep_with_experts_weighted_by_speed():
    catalog = load_catalog()
    shape = load_shape("qwen3-235b-a22b")
    work = Workload(1024, 256, tpot_s=0.2)
    factors = Factors(prefill_compute=0.4, memory=0.8, link=0.8)
    plan = evaluate_expert_split(shape, [(catalog["h20"], 8), (catalog["910b"], 8)], "int8", work, lambda c: factors)
    assert plan is not None and plan.tpot_s <= 0.2
    assert [(s.chip.key, s.tp, s.experts) for s in plan.stages] == [("h20", 8, 11), ("910b", 8, 5)]
    assert plan.kinds == {"h20": 8, "910b": 8} and "11 experts each" in plan.describe()
    assert plan.as_dict()["stages"][1]["experts"] == 5
    # a stage whose chips cannot split the heads is refused (12 chips, 64 heads)
    assert evaluate_expert_split(shape, [(catalog["h20"], 8), (catalog["910b"], 4)], "int8", work,
                                 lambda c: factors) is None
    # a dense model has no experts to split
    assert evaluate_expert_split(load_shape("llama-3.3-70b"), [(catalog["h20"], 4), (catalog["910b"], 4)], "int8",
                                 work, lambda c: factors) is None


def test_float32_weights_and_cache_move_twice_the_bytes_of_bf16():
    """A CPU without bf16 arithmetic runs the engine in float32 (calibration does too): its format is fp32."""
    from shoal.planner.cost import weights_per_chip
    from shoal.planner.shapes import kv_bytes, weight_bytes

    shape = load_shape("llama-3.1-8b")
    bf16 = Deployment(chip(), Layout(1), quant="bf16", kv_dtype="bf16", overlap=False)
    fp32 = Deployment(chip(), Layout(1), quant="fp32", kv_dtype="fp32", overlap=False)
    assert weights_per_chip(shape, fp32) == pytest.approx(2 * weights_per_chip(shape, bf16))
    assert weight_bytes("fp32") == kv_bytes("fp32") == 4.0
    factors = Factors(memory=0.8)
    # one sequence's decode step is all memory: twice the bytes, twice the time
    assert decode_step_time(shape, fp32, factors, 1, 1024)[0] == pytest.approx(
        2 * decode_step_time(shape, bf16, factors, 1, 1024)[0], rel=1e-6)


def test_calibration_runs_the_engine_in_the_dtype_this_cpu_computes_in():
    import torch

    from shoal.backends.registry import parse_device
    from shoal.planner.catalog import native_format

    backend, _ = parse_device("cpu")
    assert native_format("cpu") == ("bf16" if torch.bfloat16 in backend.native_dtypes() else "fp32")
    assert backend.default_dtype() in backend.native_dtypes()


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


def _ep_layer_us(chip_key: str, chips: int, tokens_per_chip: float, quant: str) -> tuple[float, float]:
    """One MoE layer's dispatch and combine, in us, for DeepSeek-V3 decode at `tokens_per_chip`."""
    shape = load_shape("deepseek-v3")
    dep = Deployment(load_catalog()[chip_key], Layout(chips, ep=chips), quant=quant)
    cost = forward_cost(shape, dep, Factors(link=0.8), tokens=tokens_per_chip * chips, keys=0, kv_read_tokens=0,
                        logits_tokens=0, phase="decode")
    return (cost.comm["ep dispatch"] / shape.moe_layers * 1e6, cost.comm["ep combine"] / shape.moe_layers * 1e6)


def test_expert_dispatch_reproduces_the_published_kernel_times():
    """DeepEP's low-latency kernels on H800 (EP256, 128 tokens per GPU, fp8 dispatch, bf16 combine:
    194 and 360 us, its README) and CloudMatrix384's fused operators (EP256 over dies, 128 tokens per
    die: 152 and 149 us, its paper) come out of a fixed latency plus the bytes over the link."""
    dispatch, combine = _ep_layer_us("h800", 256, 128, "fp8")
    assert dispatch == pytest.approx(194, rel=0.1) and combine == pytest.approx(360, rel=0.1)
    dispatch, combine = _ep_layer_us("cm384", 128, 256, "int8")  # a cm384 chip is one 910C: two dies
    assert dispatch == pytest.approx(152, rel=0.05) and combine == pytest.approx(149, rel=0.05)


def test_expert_dispatch_grows_with_tokens_from_its_fixed_latency():
    chips = load_catalog()
    few, many = _ep_layer_us("cm384", 160, 16, "int8"), _ep_layer_us("cm384", 160, 192, "int8")
    assert many[0] > few[0] > chips["cm384"].ep_dispatch_latency_us
    assert many[1] > few[1] > chips["cm384"].ep_combine_latency_us
    # the bytes term is proportional to the tokens: 12x the tokens, 12x what is above the latency
    assert many[0] - chips["cm384"].ep_dispatch_latency_us == pytest.approx(
        12 * (few[0] - chips["cm384"].ep_dispatch_latency_us), rel=0.01)
    # a stack without a published figure pays the fabric's start-up latency alone
    assert chips["h800"].ep_dispatch_latency_us is None
    assert _ep_layer_us("h800", 144, 1, "fp8")[0] == pytest.approx(15, abs=2)
