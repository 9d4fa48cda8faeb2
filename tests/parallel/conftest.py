"""Helpers for the split tests: run a split in its own processes (gloo on loopback) with a hard timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
RUN_TIMEOUT_S = 120
SPLIT_KEYS = {"tp", "ep", "pp"}


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # ranks share two cores
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def split_run(tmp_path_factory):
    """split_run(checkpoint folder, options) -> {"tokens", "logits", "expert_load"}; cached per session."""
    done: dict[tuple[str, str], dict] = {}

    def run(path: Path, options: dict) -> dict:
        key = (str(path), json.dumps(options, sort_keys=True))
        if key not in done:
            if not options.keys() & SPLIT_KEYS:  # one process: run it here
                sys.path.insert(0, str(HERE))
                from split_run import generate_and_record

                done[key] = generate_and_record(str(path), options)
            else:
                out = tmp_path_factory.mktemp("split") / "result.json"
                proc = subprocess.run([sys.executable, str(HERE / "split_run.py"), str(path), key[1], str(out)],
                                      env=subprocess_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
                assert proc.returncode == 0, proc.stderr[-3000:]
                done[key] = json.loads(out.read_text())
        return done[key]

    return run
