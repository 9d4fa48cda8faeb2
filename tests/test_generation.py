"""Sampling, stopping, logprobs and streaming on the minimal generation loop."""

from __future__ import annotations

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.errors import InvalidRequestError
from shoal.layers.sampler import sample_token
from shoal.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def llm(checkpoint):
    path, _ = checkpoint("llama")
    return LLM(str(path), device="cpu", dtype="float32", progress=False)


PROMPT = [5, 17, 42, 99, 7]


def test_seed_makes_sampling_reproducible(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    a, b = llm.generate([PROMPT, PROMPT], params)
    assert a.token_ids == b.token_ids
    other = llm.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=12, seed=99, ignore_eos=True))[0]
    assert other.token_ids != a.token_ids


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    top1 = llm.generate(PROMPT, SamplingParams(temperature=0.8, top_k=1, max_tokens=10, seed=3, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_top_p_and_top_k_keep_only_the_allowed_tokens():
    logits = torch.tensor([4.0, 3.0, 0.0, -1.0, -2.0])
    gen = torch.Generator().manual_seed(0)
    # probabilities are about 0.72, 0.26, 0.013, ...: with top_p 0.8 token 1 is still needed, token 2 is not
    seen_p = {sample_token(logits, SamplingParams(top_p=0.8), gen) for _ in range(300)}
    assert seen_p == {0, 1}
    seen_k = {sample_token(logits, SamplingParams(top_k=3, temperature=5.0), gen) for _ in range(300)}
    assert seen_k == {0, 1, 2}


def test_max_tokens_and_eos(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    stop_id = out.token_ids[3]
    first = out.token_ids.index(stop_id)
    stopped = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[stop_id]))[0]
    assert stopped.token_ids == out.token_ids[: first + 1] and stopped.finish_reason == "stop"


def test_stop_string_cuts_text(llm):
    full = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text = full.text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2])
    cut = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    streamed = "".join(llm.stream(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])))
    assert streamed == cut.text  # the held-back tail of a possible stop string is never shown


def test_logprobs(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    logprobs = out.outputs[0].logprobs
    assert len(logprobs) == 4
    for token, lp in zip(out.token_ids, logprobs):
        assert lp.token_id == token and len(lp.top_logprobs) == 3
        assert lp.logprob <= 0
        # greedy: the chosen token is the most likely alternative
        assert max(lp.top_logprobs, key=lp.top_logprobs.get) == token
        assert lp.top_logprobs[token] == pytest.approx(lp.logprob)


def test_streamed_text_equals_final_text(llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert "".join(llm.stream(PROMPT, params)) == llm.generate(PROMPT, params)[0].text


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_tokens=0), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-3),
     dict(logprobs=100), dict(stop=[""])],
)
def test_invalid_sampling_params(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_incremental_detokenizer_never_splits_a_character(llm):
    text = "naïve café — 日本語 ✓ done"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(llm.tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # byte-level BPE splits the CJK characters over several tokens: some steps must have emitted nothing
    assert any(p == "" for p in pieces)


def test_string_prompt_gets_bos(llm):
    out = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=2))[0]
    assert out.prompt_token_ids[0] == llm.tokenizer.bos_token_id
    assert out.prompt == "The quick brown fox"


def test_chat_template(llm):
    ids = llm.chat_prompt_ids([{"role": "user", "content": "hello"}])
    assert llm.tokenizer.decode(ids) == "user: hello\nassistant:"
