"""`shoal bench`: runs every random prompt to its full length and reports consistent figures."""

from __future__ import annotations

import argparse
import json

import pytest

from shoal.bench import add_bench_parser, cmd_bench, random_prompts
from shoal.errors import InvalidRequestError


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


def test_bench_rejects_lengths_beyond_the_context(checkpoint):
    path, _ = checkpoint("llama")  # max_position_embeddings 256
    with pytest.raises(InvalidRequestError, match="context"):
        cmd_bench(parse(["--model", str(path), "--dtype", "float32", "--input-len", "200", "--output-len", "100"]))
    with pytest.raises(InvalidRequestError, match="--num-prompts"):
        cmd_bench(parse(["--model", str(path), "--num-prompts", "0"]))
