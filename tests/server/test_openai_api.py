"""The OpenAI-compatible API, spoken to by the official `openai` client over real HTTP: completions and
chat, streamed and not, n > 1, stop strings, logprobs (checked against transformers), seeds, usage that
matches the tokenizer, and an OpenAI-format error for every bad request."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from checkpoints import VOCAB
from server_harness import API_KEY, MODEL

from shoal.server.protocol import SUPPORTED_PARAMS
from shoal.tokenizer import Tokenizer

NO_EOS = {"ignore_eos": True}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox?"}]


@pytest.fixture(scope="module")
def server(llama_server):
    return llama_server


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tokenizer(llama):
    return Tokenizer(llama[0])


def sampled_text(client, seed: int, max_tokens: int = 24) -> str:
    out = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=max_tokens,
                                    temperature=1.0, seed=seed, extra_body=NO_EOS)
    return out.choices[0].text


# ---- discovery ----------------------------------------------------------------------------------
def test_models_health_and_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/health").status_code == 200
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE shoal_time_to_first_token_seconds histogram" in response.text


def _metric_values(text: str) -> dict[str, float]:
    return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "_bucket{" not in line}


def test_metrics_time_decode_steps_and_count_their_sequences(server, client):
    before = _metric_values(httpx.get(f"{server.url}/metrics").text)
    out = client.completions.create(model=MODEL, prompt=["The quick", "brown fox"], max_tokens=6, temperature=0,
                                    extra_body=NO_EOS)
    assert out.usage.completion_tokens == 12
    after = _metric_values(httpx.get(f"{server.url}/metrics").text)
    grew = {name: after[name] - before.get(name, 0.0) for name in after}
    # Both prompts are prefilled (one step or two), then each further token is a decode step of both or one.
    assert grew["shoal_prefill_step_seconds_count"] >= 1 and grew["shoal_prefill_step_seconds_sum"] > 0
    assert 5 <= grew["shoal_decode_step_seconds_count"] <= 10 and grew["shoal_decode_step_seconds_sum"] > 0
    assert grew["shoal_decode_step_sequences_count"] == grew["shoal_decode_step_seconds_count"]
    assert grew["shoal_decode_step_sequences_sum"] == 10  # 5 more tokens each, one sequence-step per token


# ---- completions ---------------------------------------------------------------------------------
def test_completion_usage_matches_the_tokenizer(client, tokenizer):
    prompt = "The quick brown fox jumps"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body=NO_EOS)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == MODEL
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    assert out.choices[0].finish_reason == "length"


def test_completion_stream_matches_the_whole_response(client):
    options = {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "temperature": 1.0, "seed": 7, "extra_body": NO_EOS}
    whole = client.completions.create(**options)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **options))
    assert len({(c.id, c.created) for c in chunks}) == 1
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["length"]


def test_a_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, stream=True, extra_body=NO_EOS))
    assert chunks and all(c.choices and c.usage is None for c in chunks)


def test_n_completions_with_a_seed_use_seed_plus_i(client):
    options = {"model": MODEL, "prompt": "The lazy dog", "max_tokens": 8, "temperature": 1.0, "logprobs": 0, "extra_body": NO_EOS}
    three = client.completions.create(n=3, seed=11, **options)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.completion_tokens == 24
    single = client.completions.create(n=1, seed=11, **options)
    assert three.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is counted once
    # Token logprobs identify each sampled sequence (batching changes them only by float rounding).
    runs = [c.logprobs.token_logprobs for c in three.choices]
    assert runs[0] == pytest.approx(single.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert runs[1] == pytest.approx(client.completions.create(seed=12, **options).choices[0].logprobs.token_logprobs,
                                    abs=1e-4)
    assert runs[0] != pytest.approx(runs[1], abs=1e-3) and runs[1] != pytest.approx(runs[2], abs=1e-3)
    again = client.completions.create(n=3, seed=11, **options)
    assert [c.logprobs.token_logprobs for c in again.choices] == [pytest.approx(r, abs=1e-4) for r in runs]


def test_a_batch_of_prompts_gives_prompts_times_n_choices(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt=["The quick", "brown fox"], n=2, max_tokens=3,
                                    extra_body=NO_EOS)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == len(tokenizer.encode("The quick")) + len(tokenizer.encode("brown fox"))
    assert out.usage.completion_tokens == 12
    ids = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=2, extra_body=NO_EOS)
    assert ids.usage.prompt_tokens == 5 and len(ids.choices) == 2


def test_stop_strings_cut_the_text_and_finish_with_stop(client):
    # The random model writes text with some seeds and mostly unprintable bytes with others: take one with text.
    seed, text = next((s, t) for s in range(20) if len((t := sampled_text(client, s)).strip()) >= 6)
    middle = len(text) // 2
    stop = text[middle : middle + 2]
    expected = text[: text.find(stop)]
    options = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 1.0, "seed": seed,
                   "extra_body": NO_EOS}
    for stops in (stop, ["never-appears", stop]):
        out = client.completions.create(stop=stops, **options)
        assert out.choices[0].text == expected
        assert out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(stop=stop, stream=True, **options))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_completion_logprobs_are_the_models(client, llama, tokenizer):
    ids = tokenizer.encode("The quick brown fox")
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0, logprobs=5,
                                    extra_body=NO_EOS)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    with torch.no_grad():
        reference = llama[1](torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    assert logprobs.token_logprobs[0] == pytest.approx(float(reference.max()), abs=1e-4)
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 5  # different ids can decode to the same string
        assert max(top.values()) == pytest.approx(value)  # greedy picks the most likely token


def test_echo_puts_the_prompt_in_front(client):
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, echo=True, temperature=1.0,
                                    seed=3, extra_body=NO_EOS)
    plain = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=1.0, seed=3,
                                      extra_body=NO_EOS)
    assert out.choices[0].text == "Hello there" + plain.choices[0].text


# ---- chat --------------------------------------------------------------------------------------------
def test_chat_usage_matches_the_chat_template(client, tokenizer):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, extra_body=NO_EOS)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.usage.prompt_tokens == len(tokenizer.apply_chat_template(MESSAGES))
    assert out.usage.completion_tokens == 5
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length"


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(client, tokenizer):
    context = client.models.retrieve(MODEL).max_model_len  # a vLLM extra on the model card
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=NO_EOS)
    assert out.usage.completion_tokens == context - len(tokenizer.apply_chat_template(MESSAGES))
    assert out.choices[0].finish_reason == "length"


def test_chat_stream_has_the_role_first_and_one_finish_per_choice(client):
    options = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2, "extra_body": NO_EOS}
    whole = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options))
    assert len({(c.id, c.created) for c in chunks}) == 1
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 12
    for index in (0, 1):
        mine = [c.choices[0] for c in body if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert all(c.delta.role is None for c in mine[1:])
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[index].message.content


def test_chat_logprobs_match_transformers(client, llama, tokenizer):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0,
                                         logprobs=True, top_logprobs=4, extra_body=NO_EOS)
    content = out.choices[0].logprobs.content
    assert len(content) == 2 and all(len(entry.top_logprobs) == 4 for entry in content)
    ids = tokenizer.apply_chat_template(MESSAGES)
    with torch.no_grad():
        reference = llama[1](torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    expected = reference.topk(4).values.tolist()
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(expected, abs=1e-4)
    assert content[0].logprob == pytest.approx(expected[0], abs=1e-4)
    assert content[0].bytes == list(content[0].token.encode("utf-8"))


def test_chat_accepts_text_content_parts(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "The quick"}, {"type": "text", "text": " fox"}]}]
    plain = [{"role": "user", "content": "The quick fox"}]
    a = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body=NO_EOS)
    b = client.chat.completions.create(model=MODEL, messages=plain, max_tokens=2, extra_body=NO_EOS)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_vllm_sampling_extras(client):
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={"top_k": 5, **NO_EOS})
    assert out.usage.completion_tokens == 4
    for name, value in (("min_p", 0.1), ("repetition_penalty", 1.2), ("presence_penalty", 0.5)):
        options = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "extra_body": {name: value, **NO_EOS}}
        if name in SUPPORTED_PARAMS:
            assert client.completions.create(**options).usage.completion_tokens == 4
        else:
            with pytest.raises(openai.BadRequestError, match=name):
                client.completions.create(**options)


# ---- errors -------------------------------------------------------------------------------------------
def error_of(exc_info) -> dict:
    body = exc_info.value.body
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_a_wrong_or_missing_api_key_is_401(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client(api_key="wrong").models.list()
    assert error_of(caught)["code"] == "invalid_api_key"
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert error_of(caught)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": [5] * 300}, "prompt"),  # longer than the 256-token context
        ({"prompt": "fox " * 400}, "prompt"),
        ({"prompt": [5] * 10, "max_tokens": 250}, "max_tokens"),  # prompt + max_tokens past the context
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt": [-1, 5]}, "prompt"),
        ({"prompt": [5, VOCAB]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"max_tokens": "5"}, "max_tokens"),  # wrong types are refused, not coerced
        ({"temperature": "hot"}, "temperature"),
        ({"n": True}, "n"),
        ({"prompt": 5}, "prompt"),
        ({"n": 17}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"stop": "x" * 300}, "stop"),
        ({"seed": 2**64}, "seed"),
        ({"logit_bias": {"fox": 1.0}}, "logit_bias"),  # keys are token ids
        ({"logit_bias": {str(VOCAB): 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 101.0}}, "logit_bias"),
        ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
        ({"max_tokens": 0, "logprobs": 1}, "max_tokens"),  # 0 only with echo
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"echo": True, "max_tokens": -1}, "max_tokens"),
        ({"suffix": "end"}, "suffix"),
        ({"prompt": ["a", [1]]}, "prompt"),
        ({"stop_token_ids": [999]}, "stop_token_ids"),
    ],
)
def test_bad_completion_requests_are_400(client, fields, param):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{k: body.pop(k) for k in ("model", "prompt")}, extra_body=body)
    error = error_of(caught)
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs=true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),  # two tools, one name
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 129}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),  # without tools
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),  # not among the tools
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function",
                                                             "function": {"name": "f", "arguments": "{oops"}}]}]},
         "messages.0.tool_calls.0.function.arguments"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"not a name": 1}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {f"k{i}": 1 for i in range(65)}}, "chat_template_kwargs"),
        ({"continue_final_message": True}, "continue_final_message"),  # with add_generation_prompt
        ({"logit_bias": {"-1": 5}}, "logit_bias"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"max_completion_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_chat_requests_are_400(client, fields, param):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{k: body.pop(k) for k in ("model", "messages")}, extra_body=body)
    assert error_of(caught)["param"] == param


def test_unknown_fields_are_ignored(client):
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                    extra_body={"frobnicate": {"a": 1}, **NO_EOS}, user="someone")
    assert out.usage.completion_tokens == 2


def test_malformed_bodies_get_openai_errors(server):
    for content in (b"{not json", b"[1, 2]", b'{"prompt": "hi", "max_tokens": 2', b""):
        response = server.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, content
        assert response.json()["error"]["type"] == "invalid_request_error"
    huge = json.dumps({"model": MODEL, "prompt": "x" * (5 << 20)}).encode()
    response = server.post("/v1/completions", content=huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and "error" in response.json()
    response = httpx.get(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 405 and "error" in response.json()


def test_a_bug_is_a_500_that_keeps_its_text_to_itself(server, client, monkeypatch):
    def broken(created):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(server.app.state.serving, "model_card", broken)
    with pytest.raises(openai.InternalServerError) as caught:
        client.models.list()
    assert caught.value.status_code == 500
    assert error_of(caught)["type"] == "server_error" and "secret" not in caught.value.message
