"""Structured outputs in the engine (SamplingParams.structured_outputs, as LLM.generate takes it): the grammar's
mask holds sampled and greedy rows to their constraint, batched beside unconstrained rows, and it changes no
token the grammar allows; a constraint that cannot compile is refused when the request is added."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.engine.grammar import token_mask
from shoal.errors import InvalidRequestError
from shoal.layers.sampler import TokenMask, apply_token_mask
from shoal.sampling_params import MAX_GRAMMAR_BYTES, StructuredOutputsParams

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def demo():
    return LLM(progress=False)


def test_sampled_json_matches_its_schema_batched_with_free_rows(demo):
    constrained = [SamplingParams(temperature=1.0, seed=s, max_tokens=48, structured_outputs=StructuredOutputsParams(
        json=PERSON)) for s in range(6)]
    free = SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True)
    outs = demo.generate(["A person as JSON:"] * 7, constrained + [free])
    for out in outs[:6]:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), PERSON)
    assert len(outs[6].outputs[0].token_ids) == 12  # the unconstrained row ran on, in the same batch


def test_regex_and_choice_hold_greedy_and_sampled_rows(demo):
    regex = StructuredOutputsParams(regex=r"(yes|no), [0-9]{2}")
    choice = StructuredOutputsParams(choice=["red", "green", "blue"])
    params = [SamplingParams(temperature=t, seed=3, max_tokens=16, structured_outputs=c)
              for t in (0.0, 1.0) for c in (regex, choice)]
    outs = demo.generate(["Answer:"] * 4, params)
    texts = [o.outputs[0].text for o in outs]
    assert re.fullmatch(r"(yes|no), [0-9]{2}", texts[0]) and re.fullmatch(r"(yes|no), [0-9]{2}", texts[2])
    assert texts[1] in {"red", "green", "blue"} and texts[3] in {"red", "green", "blue"}


def test_the_mask_changes_no_token_the_grammar_allows(demo):
    prompt = "The list type"
    free = demo.generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    # A grammar that accepts exactly the unconstrained text (and another word): greedy must take the same tokens.
    only = StructuredOutputsParams(choice=[free.text, "elsewhere"])
    held = demo.generate([prompt], SamplingParams(temperature=0, max_tokens=10, structured_outputs=only))[0].outputs[0]
    eos = demo.engine.eos_token_ids
    # Once the grammar is complete the reply ends there, without sampling the end-of-sequence token.
    assert held.token_ids == [t for t in free.token_ids if t not in eos] and held.text == free.text
    assert held.finish_reason == "stop"


def test_a_constraint_that_cannot_compile_is_refused_when_added(demo):
    for spec, words in [(StructuredOutputsParams(json={"type": "nonsense"}), "JSON schema"),
                        (StructuredOutputsParams(regex="(unclosed"), "regex"),
                        (StructuredOutputsParams(grammar="start: missing_rule"), "grammar"),
                        (StructuredOutputsParams(json="{not json"), "not valid JSON")]:
        with pytest.raises(InvalidRequestError, match=words):
            demo.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=spec))
    assert not demo.engine.has_unfinished()


def test_structured_outputs_params_are_checked_on_creation():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(InvalidRequestError, match="exactly one.*regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_GRAMMAR_BYTES}"):
        StructuredOutputsParams(regex="a" * (MAX_GRAMMAR_BYTES + 1))
    with pytest.raises(InvalidRequestError, match="choice takes"):
        StructuredOutputsParams(choice=[""])
    assert StructuredOutputsParams(json={"b": 1, "a": 2}).key() == StructuredOutputsParams(json={"a": 2, "b": 1}).key()


def test_token_mask_leaves_padded_ids_out_and_keeps_allowed_scores(demo):
    grammars = demo.engine.grammars
    padded = demo.model_config.vocab_size + 40  # logits wider than the tokenizer, as padded checkpoints have
    matcher = grammars.matcher(StructuredOutputsParams(choice=["yes"]))
    mask = token_mask([None, matcher], padded)
    assert mask.rows == [1] and mask.allowed.shape == (1, padded)
    assert not mask.allowed[0, demo.model_config.vocab_size:].any()
    allowed = set(np.nonzero(mask.allowed[0].numpy())[0].tolist())
    assert allowed and all("yes".startswith(demo.tokenizer.decode([t])) for t in allowed)
    scores = torch.randn(2, padded)
    masked = apply_token_mask(scores, mask)
    assert torch.equal(masked[0], scores[0])
    kept = sorted(allowed)
    assert torch.equal(masked[1, kept], scores[1, kept]) and torch.isinf(masked[1]).sum() == padded - len(kept)
    every = apply_token_mask(scores, TokenMask([0, 1], torch.ones(2, padded, dtype=torch.bool)))
    assert torch.equal(every, scores)


def test_start_after_leaves_the_reply_free_until_its_marker_then_holds_the_rest(demo):
    """A reasoning model thinks first (vLLM's structured outputs with a reasoning parser): until the reply has
    written start_after the grammar neither masks nor consumes; from the next token on it holds the reply."""
    prompt = "The list type"
    free = demo.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    marker = demo.tokenizer.decode(free.token_ids[:2], skip_special_tokens=False)  # stands for "</think>"
    choices = ["yes", "no"]
    gated = StructuredOutputsParams(choice=choices, start_after=marker)
    outs = demo.generate([prompt] * 2, [SamplingParams(temperature=0, max_tokens=12, structured_outputs=spec)
                                        for spec in (gated, StructuredOutputsParams(choice=choices))])
    waited, held = outs[0].outputs[0], outs[1].outputs[0]
    assert waited.token_ids[:2] == free.token_ids[:2]  # unmasked while the marker was being written
    assert waited.text.startswith(marker) and waited.text[len(marker):] in choices
    assert waited.finish_reason == "stop"
    assert held.text in choices  # without start_after the grammar holds the reply from its first token

    matcher = demo.engine.grammars.matcher(gated)
    assert not matcher.active and token_mask([matcher], demo.model_config.vocab_size) is None
    for token in free.token_ids[:2]:
        assert matcher.accept(token) and not matcher.finished
    assert matcher.active and token_mask([matcher], demo.model_config.vocab_size).rows == [0]
    with pytest.raises(InvalidRequestError, match="start_after takes a text of 1 to 64"):
        StructuredOutputsParams(regex="a", start_after="")
    assert gated.key() == StructuredOutputsParams(choice=choices).key()  # one compiled grammar for both
