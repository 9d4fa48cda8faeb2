"""Property-based fuzzing of the whole API: schemathesis reads the server's own /openapi.json (every body
with its real bounds) and sends valid and invalid requests to every route of a live server on loopback.
No answer may be a 5xx, and the server must be healthy, serving and holding no KV block afterwards.
Bounded: a fixed number of derandomized examples per route, on a model with a 64-token context."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from server_harness import API_KEY, MODEL

from shoal import LLM

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

EXAMPLES = 12  # per route and mode; the generation routes get more: about 450 requests in all
GENERATION_EXAMPLES = {"/v1/completions": 40, "/v1/chat/completions": 40, "/v1/responses": 24, "/v1/embeddings": 24}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_fuzzing_every_route_finds_no_server_error(checkpoint, serve):
    llm = LLM(str(checkpoint("llama")[0]), dtype="float32", progress=False, max_model_len=64)
    server = serve(llm)
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json", timeout=10).json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {*GENERATION_EXAMPLES, "/tokenize", "/health"}
    failures: list[str] = []
    statuses: Counter = Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=GENERATION_EXAMPLES.get(operation.path, EXAMPLES) if operation.method.upper() ==
                      "POST" else EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                response = case.call(base_url=server.url, headers=AUTH, timeout=60)
                statuses[case.path, response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} {str(case.body)[:300]} -> "
                                    f"{response.status_code} {response.text[:300]}")

            try:
                run()
            except Unsatisfiable:  # a route without a body or parameters has no invalid request to make
                assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.path
    assert not failures, "\n".join(failures[:10])
    assert sum(statuses.values()) >= 100
    # The fuzzer reaches the engine: some generated requests are valid ones, served.
    assert all(statuses[path, 200] for path in GENERATION_EXAMPLES), statuses
    print(sorted(statuses.items()))
    assert httpx.get(f"{server.url}/health").status_code == 200
    reply = server.client().completions.create(model=MODEL, prompt="hello", max_tokens=3, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3
    assert server.wait_for_metrics(lambda m: m["shoal_kv_cache_blocks_used"] == 0)["shoal_kv_cache_blocks_used"] == 0
