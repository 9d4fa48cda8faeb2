"""What evaluation harnesses send, over real HTTP with the official `openai` client: echo with logprobs
and max_tokens 0 or 1 (lm-evaluation-harness's local-completions loglikelihood request), vLLM's
prompt_logprobs, /tokenize, /detokenize and /tokenizer_info in vLLM's shapes, and logit_bias; every
prompt token's logprob checked against transformers' float32 log_softmax within 1e-3."""

from __future__ import annotations

from operator import itemgetter

import httpx
import pytest
import torch
from server_harness import API_KEY, MODEL

from shoal import LLM, SamplingParams
from shoal.tokenizer import Tokenizer

NO_EOS = {"ignore_eos": True}
TEXT = "The quick brown fox jumps over the lazy dog. Héllo wörld"


@pytest.fixture(scope="module")
def server(llama, serve):
    # A small batch budget: a prompt is scored over several prefill chunks.
    return serve(LLM(str(llama[0]), dtype="float32", progress=False, max_num_batched_tokens=8))


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tokenizer(llama):
    return Tokenizer(llama[0])


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row j is the float32 log-distribution transformers gives after ids[: j + 1]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def lm_eval_parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-evaluation-harness 0.4.13's LocalCompletionsAPI.parse_logprobs, as it reads a response."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens):
        logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(logprobs), all(tok == max(top.values()) for tok, top in zip(logprobs, tops))))
    return res


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_score_every_prompt_token_as_transformers_does(client, llama, tokenizer, max_tokens):
    ids = tokenizer.encode(TEXT)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, echo=True, logprobs=3,
                                    temperature=0, extra_body=NO_EOS)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    reference = reference_logprobs(llama[1], ids)
    expected = [float(reference[j - 1, ids[j]]) for j in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-3)
    for j in range(1, len(ids)):
        top = reference[j - 1].topk(3).values.tolist()
        assert max(lp.top_logprobs[j].values()) == pytest.approx(top[0], abs=1e-3)
        assert 1 <= len(lp.top_logprobs[j]) <= 3
    assert lp.tokens[: len(ids)] == [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    assert lp.text_offset[: len(ids)] == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(ids))]
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == max_tokens
    if max_tokens == 0:
        assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
    else:  # the generated token follows, under the distribution after the whole prompt
        assert lp.token_logprobs[-1] == pytest.approx(float(reference[-1].max()), abs=1e-3)


def test_lm_eval_loglikelihood_requests_match_transformers(server, llama, tokenizer):
    """The request body lm-eval's local-completions model sends for loglikelihood (token-id prompts, batched),
    and its own parsing of the answer: the continuation's summed logprob and whether it is greedy."""
    pairs = [("The quick brown", " fox"), ("Héllo", " wörld"), ("The lazy", " dog jumps")]
    prompts, ctxlens = [], []
    for context, continuation in pairs:
        ctx = tokenizer.encode(context, add_special_tokens=False)
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prompts.append(ctx + cont)
        ctxlens.append(len(ctx))
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    response = server.post("/v1/completions", json=body)
    assert response.status_code == 200
    parsed = lm_eval_parse_logprobs(response.json(), ctxlens)
    for (total, greedy), ids, ctxlen in zip(parsed, prompts, ctxlens):
        reference = reference_logprobs(llama[1], ids)
        expected = sum(float(reference[j - 1, ids[j]]) for j in range(ctxlen, len(ids)))
        assert total == pytest.approx(expected, abs=1e-3)
        assert greedy == all(int(reference[j - 1].argmax()) == ids[j] for j in range(ctxlen, len(ids)))


def test_echo_logprobs_stream_the_scored_prompt_first(client, tokenizer):
    ids = tokenizer.encode(TEXT)
    options = {"model": MODEL, "prompt": ids, "max_tokens": 2, "echo": True, "logprobs": 2, "temperature": 0,
               "extra_body": NO_EOS}
    whole = client.completions.create(**options).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **options)]
    assert chunks[0].text == tokenizer.decode(ids)
    assert chunks[0].logprobs.token_logprobs == whole.logprobs.token_logprobs[: len(ids)]
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs


def test_max_tokens_zero_streams_the_prompt_alone(client, tokenizer):
    chunks = [c.choices[0] for c in client.completions.create(model=MODEL, prompt="Hello there", max_tokens=0,
                                                              echo=True, logprobs=1, stream=True)]
    assert "".join(c.text for c in chunks) == "Hello there"
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]
    assert len(chunks[0].logprobs.tokens) == len(tokenizer.encode("Hello there"))


def test_vllm_prompt_logprobs_on_completions_and_chat(server, llama, tokenizer):
    ids = tokenizer.encode(TEXT)
    response = server.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1,
                                                    "prompt_logprobs": 2})
    assert response.status_code == 200
    prompt_logprobs = response.json()["choices"][0]["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    reference = reference_logprobs(llama[1], ids)
    for j in range(1, len(ids)):
        entry = prompt_logprobs[j]
        own = entry[str(ids[j])]
        assert own["logprob"] == pytest.approx(float(reference[j - 1, ids[j]]), abs=1e-3)
        assert own["rank"] == int((reference[j - 1] > reference[j - 1, ids[j]]).sum()) + 1
        assert own["decoded_token"] == tokenizer.decode([ids[j]], skip_special_tokens=False)
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert ranked[0]["rank"] == 1 and ranked[0]["logprob"] == pytest.approx(float(reference[j - 1].max()), abs=1e-3)
        assert len(entry) <= 3  # its own token and the top 2
    messages = [{"role": "user", "content": "The quick brown fox?"}]
    chat = server.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1,
                                                     "prompt_logprobs": 0}).json()
    chat_ids = tokenizer.apply_chat_template(messages)
    assert len(chat["prompt_logprobs"]) == len(chat_ids)
    reference = reference_logprobs(llama[1], chat_ids)
    assert chat["prompt_logprobs"][-1][str(chat_ids[-1])]["logprob"] == pytest.approx(
        float(reference[-2, chat_ids[-1]]), abs=1e-3)


def test_prompt_logprobs_offline_through_llm_generate(server, llama):
    llm = server.app.state.serving.llm
    ids = llm.tokenizer.encode(TEXT)
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1, n=2, seed=0))[0]
    reference = reference_logprobs(llama[1], ids)
    assert out.prompt_logprobs[0] is None
    assert [lp.logprob for lp in out.prompt_logprobs[1:]] == pytest.approx(
        [float(reference[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-3)


def test_tokenize_and_detokenize_in_vllm_shapes(server, tokenizer):
    out = server.post("/tokenize", json={"model": MODEL, "prompt": TEXT, "return_token_strs": True}).json()
    ids = tokenizer.encode(TEXT)
    assert out["tokens"] == ids and out["count"] == len(ids) and out["max_model_len"] == 256
    assert out["token_strs"] == [tokenizer.id_to_token(i) for i in ids]
    plain = server.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer.encode(TEXT, add_special_tokens=False) and plain["token_strs"] is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = server.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(messages)
    assert server.post("/detokenize", json={"tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}
    info = httpx.get(f"{server.url}/tokenizer_info", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and info["chat_template"] == tokenizer.chat_template


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model"),
        ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "chat_template_kwargs": {"tools": 1}},
         "chat_template_kwargs"),
        ("/detokenize", {"tokens": [5, 100000]}, "tokens"),
        ("/detokenize", {"tokens": "5"}, "tokens"),
    ],
)
def test_bad_tokenizer_requests_are_4xx_with_openai_errors(server, path, body, param):
    response = server.post(path, json=body)
    assert response.status_code == (404 if param == "model" else 400)
    assert response.json()["error"]["param"] == param


def test_tokenizer_endpoints_take_the_api_key(server):
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "a"}).status_code == 401
    assert httpx.get(f"{server.url}/tokenizer_info").status_code == 401


def test_logit_bias_steers_greedy_and_sampled_tokens(client, tokenizer):
    target = tokenizer.encode(" fox", add_special_tokens=False)[0]
    for temperature in (0, 1.0):
        out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=temperature, seed=1,
                                        logit_bias={str(target): 100}, extra_body=NO_EOS)
        assert out.choices[0].text == tokenizer.decode([target] * 4)
    plain = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, extra_body=NO_EOS)
    banned = tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[0]
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=0, logprobs=1,
                                    logit_bias={str(banned): -100}, extra_body=NO_EOS)
    assert tokenizer.encode(out.choices[0].text, add_special_tokens=False)[0] != banned


def test_prompt_logprobs_on_a_runner_that_cannot_score_prompts_is_a_400(server, client, monkeypatch):
    import openai

    from shoal.engine.runner import ModelRunner
    from shoal.parallel.runtime import ParallelRunner

    assert server.app.state.serving.llm.engine.scores_prompts
    assert ParallelRunner.step is not ModelRunner.step  # so a split model's engine says it cannot score prompts
    monkeypatch.setattr(server.app.state.serving.llm.engine, "scores_prompts", False)  # as a split model's
    for extra in ({"echo": True, "logprobs": 1}, {"prompt_logprobs": 1}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=1, extra_body=extra)
        assert caught.value.response.json()["error"]["code"] == "unsupported_parameter"
