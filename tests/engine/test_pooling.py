"""SamplingParams.pooling (what /v1/embeddings serves): the prompt's final hidden states, last-token or mean
pooled, equal transformers' (output_hidden_states[-1], after the last norm) on the demo model — also when the
prompt is prefilled over several chunks, and when the same prompt ran before (no cached prefix stands in for
the hidden states it needs)."""

from __future__ import annotations

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.config import DEMO_MODEL_PATH
from shoal.errors import InvalidRequestError

PROMPT = "The quick brown fox jumps over the lazy dog, then naps in the afternoon sun by the river bank."


def test_pooled_hidden_states_equal_transformers_over_chunks_and_a_cached_prefix():
    transformers = pytest.importorskip("transformers")
    llm = LLM(progress=False, dtype="float32", max_num_batched_tokens=8)  # the prompt runs in several chunks
    ids = llm.tokenizer.encode(PROMPT)
    assert len(ids) > 16
    reference = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32).eval()
    with torch.no_grad():
        states = reference(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    expected = {"last": states[-1], "mean": states.mean(0)}
    llm.generate([PROMPT], SamplingParams(max_tokens=2))  # its blocks are now in the prefix cache
    for pooling in ("last", "mean", "last"):
        out = llm.generate([PROMPT], SamplingParams(max_tokens=1, pooling=pooling))[0]
        got = torch.tensor(out.embedding)
        torch.testing.assert_close(got, expected[pooling], atol=1e-4, rtol=1e-4)
    assert llm.generate([PROMPT], SamplingParams(max_tokens=1))[0].embedding is None
    with pytest.raises(InvalidRequestError, match="pooling must be one of None, last, mean"):
        SamplingParams(pooling="cls")
