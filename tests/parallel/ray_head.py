"""A small local Ray cluster for the Ray tests, held for as long as this process's stdin stays open.

Run as a script: starts the head (ray.init: a GCS, a raylet, a small object store, no dashboard),
prints one JSON line with the cluster's address, waits for stdin to close, then shuts the cluster
down — so the cluster ends with the test that started it, even when the test dies (ray.init's
processes end with their driver)."""

from __future__ import annotations

import json
import sys

OBJECT_STORE_BYTES = 200 * 10**6  # the workers exchange nothing through it: the smallest Ray accepts is fine


def main() -> None:
    import ray

    temp_dir, num_cpus = sys.argv[1], int(sys.argv[2])
    context = ray.init(num_cpus=num_cpus, num_gpus=0, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                       _temp_dir=temp_dir, configure_logging=False, log_to_driver=False)
    print(json.dumps({"address": context.address_info["gcs_address"]}), flush=True)
    sys.stdin.read()
    ray.shutdown()


if __name__ == "__main__":
    main()
