"""Runs greedy generation on a checkpoint with a split (JSON options, e.g. {"tp": 2}) and writes the
tokens, the logits of every sampled row (keyed by prompt and position) and the expert load as JSON.
Run as a script by the parallel tests (one process per split, so each test owns its process group);
`generate_and_record` also gives the single-process reference in the test process."""

from __future__ import annotations

import json
import sys

PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 4, 200, 17], [9] * 20, [44, 45]]
MAX_TOKENS = 6


def generate_and_record(model: str, options: dict) -> dict:
    import shoal.engine.runner as single
    import shoal.parallel.runtime as split
    from shoal import LLM, SamplingParams

    logits_by_row: dict[str, list[float]] = {}
    original = single.sample_batch

    def recording(logits, params, generators, prompts, outputs, **options):
        for row, (prompt, output) in enumerate(zip(prompts, outputs)):
            logits_by_row[f"{list(prompt)}@{len(output)}"] = logits[row].tolist()
        return original(logits, params, generators, prompts, outputs, **options)

    single.sample_batch = split.sample_batch = recording
    try:
        llm = LLM(model, device="cpu", dtype="float32", progress=False, kv_cache_memory=1 << 20,
                  collective_timeout=60, **options)
        try:
            outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
            load = llm.engine.expert_load()
        finally:
            llm.shutdown()
    finally:
        single.sample_batch = split.sample_batch = original
    return {"tokens": [o.outputs[0].token_ids for o in outputs], "logits": logits_by_row,
            "expert_load": {str(k): v for k, v in load.items()}}


def main() -> None:
    import torch

    torch.set_num_threads(1)
    result = generate_and_record(sys.argv[1], json.loads(sys.argv[2]))
    with open(sys.argv[3], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
