"""`shoal bench`: runs every random prompt to its full length and reports consistent figures, offline
and against a real server (`--serve-url`, streaming /v1/completions under load)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

from shoal.bench import (
    RequestOutcome,
    add_bench_parser,
    cmd_bench,
    percentile,
    random_lengths,
    random_prompts,
    serving_metrics,
)
from shoal.errors import InvalidRequestError, ShoalError

sys.path.insert(0, str(Path(__file__).parent / "server"))
from server_harness import API_KEY, MODEL, RunningServer

VOCAB = 384  # tests/checkpoints.py


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shoal")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_bench_reports_throughput_and_writes_json(checkpoint, tmp_path, capsys):
    path, _ = checkpoint("llama")
    out = tmp_path / "bench.json"
    args = parse([
        "--model", str(path), "--dtype", "float32", "--device", "cpu", "--num-prompts", "5", "--input-len", "9",
        "--output-len", "4", "--max-num-seqs", "3", "--json-out", str(out),
    ])
    assert cmd_bench(args) == 0
    printed = capsys.readouterr().out
    assert "requests/s" in printed and "output tokens/s" in printed and "total tokens/s" in printed
    result = json.loads(out.read_text())
    assert result["num_requests"] == 5
    assert result["input_tokens"] == 45 and result["output_tokens"] == 20 and result["total_num_tokens"] == 65
    assert result["max_num_seqs"] == 3 and result["dtype"] == "float32" and result["input_len"] == 9
    elapsed = result["elapsed_time"]
    assert elapsed > 0
    assert result["requests_per_second"] == pytest.approx(5 / elapsed)
    assert result["output_tokens_per_second"] == pytest.approx(20 / elapsed)
    assert result["tokens_per_second"] == pytest.approx(65 / elapsed)
    # 5 requests, at most 3 at a time, 4 tokens each: at least 4 + 4 steps
    assert result["engine_steps"] >= 8


def test_random_prompts_are_seeded_and_avoid_eos():
    a = random_prompts(3, 50, 20, seed=1, avoid=frozenset({1}))
    assert a == random_prompts(3, 50, 20, seed=1, avoid=frozenset({1}))
    assert a != random_prompts(3, 50, 20, seed=2, avoid=frozenset({1}))
    assert all(len(p) == 50 and 1 not in p and all(0 <= t < 20 for t in p) for p in a)


def test_range_ratio_varies_each_requests_lengths_within_bounds(checkpoint, tmp_path):
    lengths = random_lengths(200, 40, 0.5, seed=3)
    assert lengths == random_lengths(200, 40, 0.5, seed=3) and min(lengths) >= 20 and max(lengths) <= 60
    assert len(set(lengths)) > 10  # spread, not constant
    assert random_lengths(4, 40, 0.0, seed=3) == [40] * 4
    path, _ = checkpoint("llama")
    out = tmp_path / "bench.json"
    args = parse(["--model", str(path), "--dtype", "float32", "--num-prompts", "6", "--input-len", "10",
                  "--output-len", "8", "--range-ratio", "0.5", "--json-out", str(out)])
    assert cmd_bench(args) == 0
    result = json.loads(out.read_text())
    assert result["output_tokens"] == sum(random_lengths(6, 8, 0.5, seed=0))
    assert result["input_tokens"] == sum(map(len, random_prompts(6, 10, 300, 0, range_ratio=0.5)))
    with pytest.raises(InvalidRequestError, match="range-ratio"):
        cmd_bench(parse(["--model", str(path), "--range-ratio", "1.5"]))


def test_bench_rejects_lengths_beyond_the_context(checkpoint):
    path, _ = checkpoint("llama")  # max_position_embeddings 256
    with pytest.raises(InvalidRequestError, match="context"):
        cmd_bench(parse(["--model", str(path), "--dtype", "float32", "--input-len", "200", "--output-len", "100"]))
    with pytest.raises(InvalidRequestError, match="--num-prompts"):
        cmd_bench(parse(["--model", str(path), "--num-prompts", "0"]))


# ---- serving load (--serve-url) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(checkpoint):
    from shoal import LLM
    from shoal.server.app import build_app

    path, _ = checkpoint("llama")
    running = RunningServer(build_app(LLM(str(path), dtype="float32", progress=False), served_model_name=MODEL,
                                      api_key=API_KEY))
    yield running
    running.stop()


SERVING_FIELDS = [
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput", "request_goodput", "input_lens", "output_lens", "errors",
] + [f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p90", "p99")]


def serving_args(server, tmp_path, *extra: str) -> argparse.Namespace:
    return parse([
        "--serve-url", f"{server.url}/v1", "--api-key", API_KEY, "--vocab-size", str(VOCAB), "--num-prompts", "8",
        "--input-len", "12", "--output-len", "6", "--request-timeout-s", "60", "--timeout-s", "120",
        "--no-progress", "--json-out", str(tmp_path / "serve.json"), *extra,
    ])


def test_serving_bench_streams_every_request_and_counts_tokens_exactly(server, tmp_path, capsys):
    assert cmd_bench(serving_args(server, tmp_path, "--max-concurrency", "3", "--seed", "4")) == 0
    printed = capsys.readouterr().out
    for label in ("Successful requests:", "Request throughput (req/s):", "Output token throughput (tok/s):",
                  "Total token throughput (tok/s):", "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):",
                  "P90 E2EL (ms):"):
        assert label in printed
    assert "goodput" not in printed  # no SLO given
    result = json.loads((tmp_path / "serve.json").read_text())
    assert set(SERVING_FIELDS) <= set(result)
    assert result["model"] == MODEL and result["request_rate"] == "inf" and result["max_concurrency"] == 3
    assert result["completed"] == 8 and result["failed"] == 0 and result["errors"] == [""] * 8
    assert result["output_lens"] == [6] * 8 and result["input_lens"] == [12] * 8
    assert result["total_output_tokens"] == 48 and result["total_input_tokens"] == 96
    duration = result["duration"]
    assert duration > 0 and result["request_goodput"] is None
    assert result["request_throughput"] == pytest.approx(8 / duration)
    assert result["output_throughput"] == pytest.approx(48 / duration)
    assert result["total_token_throughput"] == pytest.approx(144 / duration)
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < result[f"median_{name}_ms"] <= result[f"p90_{name}_ms"] <= result[f"p99_{name}_ms"]
    assert result["mean_ttft_ms"] < result["mean_e2el_ms"] <= duration * 1000


def test_serving_bench_poisson_arrivals_and_goodput(server, tmp_path, capsys):
    args = serving_args(server, tmp_path, "--request-rate", "50", "--slo-ttft-ms", "1e9", "--slo-tpot-ms", "1e9",
                        "--temperature", "1.0")
    assert cmd_bench(args) == 0
    assert "Request goodput (req/s):" in capsys.readouterr().out
    result = json.loads((tmp_path / "serve.json").read_text())
    assert result["request_rate"] == 50 and result["failed"] == 0 and result["output_lens"] == [6] * 8
    assert result["temperature"] == 1.0  # sampled requests: still every token counted
    assert result["good_requests"] == 8 and result["request_goodput"] == pytest.approx(result["request_throughput"])


def test_serving_bench_reports_bad_setups_in_one_line(server, tmp_path):
    with pytest.raises(ShoalError, match="models answered HTTP 401"):
        cmd_bench(serving_args(server, tmp_path, "--api-key", "wrong"))
    with pytest.raises(ShoalError, match="warm-up request .* failed: HTTP 404"):
        cmd_bench(serving_args(server, tmp_path, "--model-name", "no-such-model"))
    with pytest.raises(InvalidRequestError, match="context is 256"):
        cmd_bench(serving_args(server, tmp_path, "--input-len", "252"))
    with pytest.raises(InvalidRequestError, match="--model-name"):
        cmd_bench(serving_args(server, tmp_path, "--model", "x"))
    with pytest.raises(InvalidRequestError, match="--request-rate"):
        cmd_bench(serving_args(server, tmp_path, "--request-rate", "0"))
    with pytest.raises(InvalidRequestError, match="only with --serve-url"):
        cmd_bench(parse(["--max-concurrency", "4"]))
    with pytest.raises(InvalidRequestError, match="--temperature must be within"):
        cmd_bench(serving_args(server, tmp_path, "--temperature", "3"))


def test_serving_metrics_percentiles_tpot_and_goodput():
    assert percentile([], 50) == 0.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)  # numpy's linear interpolation
    fast = RequestOutcome(success=True, prompt_tokens=10, output_tokens=5, ttft=0.1, e2e=0.5, itl=[0.1] * 4)
    slow = RequestOutcome(success=True, prompt_tokens=10, output_tokens=5, ttft=1.0, e2e=3.0, itl=[0.5] * 4)
    failed = RequestOutcome(error="HTTP 500")
    result = serving_metrics([fast, slow, failed], duration=4.0, slo_ttft_ms=500, slo_tpot_ms=200)
    assert result["completed"] == 2 and result["failed"] == 1
    assert result["total_input_tokens"] == 20 and result["total_output_tokens"] == 10
    assert result["request_throughput"] == pytest.approx(0.5) and result["output_throughput"] == pytest.approx(2.5)
    assert result["total_token_throughput"] == pytest.approx(7.5)
    assert result["mean_tpot_ms"] == pytest.approx((100 + 500) / 2)  # (e2e - ttft) / (tokens - 1)
    assert result["median_itl_ms"] == pytest.approx(300) and result["mean_e2el_ms"] == pytest.approx(1750)
    assert result["good_requests"] == 1 and result["request_goodput"] == pytest.approx(0.25)
    assert math.isclose(serving_metrics([], 1.0)["request_throughput"], 0.0)
