"""Checks the memory bandwidth `shoal doctor` reports against an independent plain-torch copy benchmark.

Acceptance: the two agree within 20%. Usage: python benchmarks/doctor_bandwidth.py [--device D] [--quick]
The plain benchmark is written here on purpose, without shoal's measuring code, so the two can disagree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from shoal.backends.doctor import doctor_report

TOLERANCE = 0.20


def plain_copy_gbps(device: torch.device, mib: int = 512, reps: int = 10) -> float:
    """GB/s of b.copy_(a) over a `mib` MiB float32 tensor, bytes read plus written, median of `reps`."""
    a = torch.rand(mib * (1 << 20) // 4, device=device)
    b = torch.empty_like(a)
    sync = (lambda: None) if device.type == "cpu" else torch.accelerator.synchronize
    b.copy_(a)  # warm-up: first touch of b's pages
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        b.copy_(a)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * a.nbytes / statistics.median(times) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="device to measure (default: what shoal picks)")
    parser.add_argument("--quick", action="store_true", help="doctor's quick mode (smaller copy, fewer reps)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate doctor and plain this many times and compare medians, so load from "
                             "other processes on a shared machine hits both sides alike")
    args = parser.parse_args()

    doctor_runs, plain_runs = [], []
    for _ in range(args.rounds):
        report = doctor_report(device=args.device, quick=args.quick)
        doctor_runs.append(report["throughput"]["memory_bandwidth_gbps"])
        plain_runs.append(plain_copy_gbps(torch.device(report["selected"]["device"])))
    doctor, plain = statistics.median(doctor_runs), statistics.median(plain_runs)
    ratio = doctor / plain
    verdict = "PASS" if abs(ratio - 1) <= TOLERANCE else "FAIL"

    selected = report["selected"]
    print(f"device: {selected['backend']}:{selected['index']} ({selected['name']}), "
          f"torch {report['torch_version']}, {report['threads']} threads, median of {args.rounds} rounds")
    rows = [
        ("shoal doctor" + (" (quick)" if args.quick else ""), doctor, doctor_runs),
        ("plain torch copy, 512 MiB", plain, plain_runs),
    ]
    for label, value, runs in rows:
        each = ", ".join(f"{run:.2f}" for run in runs)
        print(f"  {label:<28}{value:9.2f} GB/s   (rounds: {each})")
    print(f"  {'ratio doctor / plain':<28}{ratio:9.3f}        {verdict} (acceptance: within {TOLERANCE:.0%})")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
