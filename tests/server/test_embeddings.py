"""POST /v1/embeddings through the official openai client: each input's normalized last-token (default) or mean
hidden state equals transformers' final hidden states (output_hidden_states[-1], after the last norm) on the
same checkpoint, as float and as base64 (the client's default), for strings, lists of strings and token ids,
batched; `dimensions` other than the model's width, empty inputs and ids outside the vocabulary are 400s."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import torch
from server_harness import API_KEY, MODEL

from shoal.server.embeddings import MAX_INPUTS
from shoal.tokenizer import Tokenizer

TEXTS = ["The quick brown fox.", "A much longer sentence, about a lazy dog that sleeps all day in the sun."]


def reference(model, ids: list[int], pooling: str) -> np.ndarray:
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()
    pooled = states[-1] if pooling == "last" else states.mean(0)
    return (pooled / pooled.norm()).numpy()


def test_embeddings_equal_transformers_hidden_states(llama_server, llama):
    path, model = llama
    tokenizer = Tokenizer(path)
    client = llama_server.client()
    ids = [tokenizer.encode(t) for t in TEXTS]
    for pooling in ("last", "mean"):
        expected = [reference(model, i, pooling) for i in ids]
        floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float",
                                          extra_body={"pooling": pooling})
        packed = client.embeddings.create(model=MODEL, input=TEXTS, extra_body={"pooling": pooling})  # base64
        from_ids = client.embeddings.create(model=MODEL, input=ids, extra_body={"pooling": pooling})
        for out in (floats, packed, from_ids):
            assert [d.index for d in out.data] == [0, 1]
            for got, want in zip(out.data, expected):
                np.testing.assert_allclose(np.asarray(got.embedding), want, atol=1e-4)
        assert floats.usage.prompt_tokens == sum(map(len, ids))
        assert abs(np.linalg.norm(floats.data[0].embedding) - 1) < 1e-5
    single = client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=model.config.hidden_size)
    np.testing.assert_allclose(single.data[0].embedding, reference(model, ids[0], "last"), atol=1e-4)
    one_list = client.embeddings.create(model=MODEL, input=ids[1])
    np.testing.assert_allclose(one_list.data[0].embedding, reference(model, ids[1], "last"), atol=1e-4)


@pytest.mark.parametrize("body, param, words", [
    ({"input": "x", "dimensions": 3}, "dimensions", "cannot be shortened to 3"),
    ({"input": ""}, "input", "input must be a non-empty string"),
    ({"input": []}, "input", "input must be a non-empty string"),
    ({"input": [[1, 2], [10 ** 6]]}, "input", "token id 1000000 is outside the vocabulary"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, "input", f"a list of 1 to {MAX_INPUTS} non-empty strings"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "x", "pooling": "cls"}, "pooling", "'last' or 'mean'"),
])
def test_bad_embedding_requests_are_400s_naming_their_field(llama_server, body, param, words):
    response = httpx.post(f"{llama_server.url}/v1/embeddings", json={"model": MODEL, **body},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_the_official_client_sees_a_refusal_as_bad_request(llama_server):
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        llama_server.client().embeddings.create(model=MODEL, input="x", dimensions=2)
