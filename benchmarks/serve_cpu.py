"""32 concurrent streaming requests on this CPU: `shoal serve` against llama.cpp's `llama-server` with
32 parallel slots, both serving the same GGUF file, loaded by the same client (`shoal bench
--serve-url`: random token-id prompts, streamed /v1/completions, ignore_eos, usage in the last chunk).

    python benchmarks/serve_cpu.py [--gguf-types Q4_0,Q8_0] [--num-prompts 64] [--concurrency 32]
                                   [--input-len 128] [--output-len 64] [--rounds 2]

The GGUF files are the ones `benchmarks/compare_cpu.py` writes (~0.5B random-weight Llama, in
~/.cache/shoal-bench); this script builds any that are missing or hold an older tokenizer with
compare_cpu.py's functions. The checkpoint's tokenizer has text for every one of its 32000 ids
(tests/checkpoints.py: write_full_tokenizer), so both servers stream each generated token as a text
chunk and TTFT / TPOT come from those chunks. `llama-server` is built from the llama.cpp sources inside the
llama-cpp-python sdist that compare_cpu.py downloads, with the same CMake flags (each x86 extension the
host has, never AMX: its AMX kernels crash on quantized models on the Xeons tried): pass --llama-server
to use another binary. The two servers never run at once: each round starts one, loads it, stops it, then the other,
so each has both cores. Prints output tok/s, median TTFT, median TPOT and the median end-to-end time per
output token for each, and the throughput ratio; writes JSON (every round's row, with p99 TPOT and ITL too).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "shoal-bench"
LLAMA_CPP_SOURCE = Path("/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp")


def cmake_flags() -> list[str]:
    """compare_cpu.py's flags for this CPU (each x86 extension only where the host has it), plus a
    Release build of the server alone."""
    from compare_cpu import llama_cpp_cmake_args
    return ["-DCMAKE_BUILD_TYPE=Release", *llama_cpp_cmake_args().split(), "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_llama_server(build_dir: Path) -> Path:
    binary = build_dir / "bin" / "llama-server"
    if binary.exists():
        return binary
    if not LLAMA_CPP_SOURCE.exists():
        raise SystemExit(f"no llama.cpp sources at {LLAMA_CPP_SOURCE}: run benchmarks/compare_cpu.py first "
                         "(it downloads the llama-cpp-python sdist), or pass --llama-server")
    subprocess.run(["cmake", "-S", str(LLAMA_CPP_SOURCE), "-B", str(build_dir), *cmake_flags()], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True)
    return binary


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready at {url} after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(port: int, args, label: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "shoal", "bench", "--serve-url", f"http://127.0.0.1:{port}/v1",
               "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--max-concurrency", str(args.concurrency),
               "--vocab-size", "32000", "--temperature", str(args.temperature), "--no-progress", "--json-out", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    result["server"] = label
    return result


def serve_shoal(gguf: Path, port: int, args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "shoal", "serve", "--model", str(gguf), "--port", str(port), "--dtype", "bfloat16",
           "--max-num-seqs", str(args.concurrency), "--max-model-len", str(args.input_len + args.output_len + 32),
           "--log-level", "warning"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def serve_llama_cpp(binary: Path, gguf: Path, port: int, args) -> subprocess.Popen:
    context = args.concurrency * (args.input_len + args.output_len + 32)  # split evenly over the slots
    cmd = [str(binary), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-np", str(args.concurrency),
           "-c", str(context), "-t", str(args.threads), "-tb", str(args.threads), "-b", "512", "-ub", "512",
           "--no-webui"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ensure_gguf(gguf_type: str) -> Path:
    """The benchmark GGUF file, built (or rebuilt, if it holds an older tokenizer) by compare_cpu.py's
    functions, whose checkpoint gets a tokenizer with text for every id."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare_cpu import build_gguf, build_llama

    return build_gguf(build_llama(CACHE), gguf_type)


def summary(result: dict, output_len: int) -> dict:
    keep = ("server", "completed", "output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
            "median_itl_ms", "median_e2el_ms")
    row = {k: result.get(k) for k in keep}
    row["e2e_ms_per_output_token"] = result["median_e2el_ms"] / output_len
    if (result.get("median_itl_ms") or 0.0) < 0.1 * row["e2e_ms_per_output_token"]:
        # tokens streamed one by one arrive a decode step apart; text held back arrives in a burst
        print(f"warning: {result['server']} streamed its text in bursts (median gap between chunks "
              f"{result.get('median_itl_ms') or 0.0:.1f} ms, {row['e2e_ms_per_output_token']:.1f} ms per output "
              "token end to end), so its TTFT and TPOT are not per token; check that the GGUF's tokenizer has "
              f"text for every id (delete the GGUF files in {CACHE} to have them rebuilt)", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf-types", default="Q4_0,Q8_0")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="llama-server's threads (shoal: torch's default)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0, help="the requests' sampling temperature (default 0)")
    ap.add_argument("--llama-server", default=None, help="path of a llama-server binary (default: build one)")
    ap.add_argument("--build-dir", default="/tmp/lcp/server-build")
    ap.add_argument("--json-out", default="benchmarks/results_serve_cpu.json")
    args = ap.parse_args(argv)
    binary = Path(args.llama_server) if args.llama_server else build_llama_server(Path(args.build_dir))
    rows = []
    for gguf_type in args.gguf_types.split(","):
        gguf = ensure_gguf(gguf_type)
        for round_index in range(args.rounds):
            for label, start in (("shoal", lambda p: serve_shoal(gguf, p, args)),
                                 ("llama.cpp", lambda p: serve_llama_cpp(binary, gguf, p, args))):
                port = free_port()
                proc = start(port)
                try:
                    wait_ready(f"http://127.0.0.1:{port}/health", proc)
                    result = load(port, args, label)
                finally:
                    stop(proc)
                row = {"gguf": gguf_type, "round": round_index + 1, **summary(result, args.output_len)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(f"{args.num_prompts} requests, {args.concurrency} at a time, {args.input_len} tokens in, "
          f"{args.output_len} out; medians over {args.rounds} rounds")
    print("| GGUF | server | output tok/s | median TTFT ms | median TPOT ms | median end-to-end ms per output token | "
          "shoal / llama.cpp (output tok/s) |")
    print("|---|---|---|---|---|---|---|")
    for gguf_type in args.gguf_types.split(","):
        med = {}
        for label in ("shoal", "llama.cpp"):
            mine = [r for r in rows if r["gguf"] == gguf_type and r["server"] == label]
            med[label] = {k: statistics.median(r[k] for r in mine) for k in
                          ("output_throughput", "median_ttft_ms", "median_tpot_ms", "e2e_ms_per_output_token")}
        for label in ("shoal", "llama.cpp"):
            m = med[label]
            ratio = m["output_throughput"] / med["llama.cpp"]["output_throughput"]
            print(f"| {gguf_type} | {label} | {m['output_throughput']:.1f} | {m['median_ttft_ms']:.0f} | "
                  f"{m['median_tpot_ms']:.1f} | {m['e2e_ms_per_output_token']:.1f} | {ratio:.2f}x |")
    Path(args.json_out).write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
