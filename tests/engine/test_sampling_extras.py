"""Sampling beyond temperature / top-k / top-p: penalties, min-p, n completions per prompt, seeds that
hold inside a mixed batch, and the bounds on every new field."""

from __future__ import annotations

import math
import random

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.errors import InvalidRequestError
from shoal.layers.sampler import apply_penalties, filtered_probs, make_generator, sample_batch

ROW = [2.0, -2.0, 1.0, 0.5, -1.0]


def penalised(prompt: list[int], output: list[int], **kwargs) -> list[float]:
    logits = torch.tensor([ROW])
    return apply_penalties(logits, [SamplingParams(**kwargs)], [prompt], [output])[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    # token 0 (positive) is in the prompt, token 1 (negative) in the output, tokens 2-4 nowhere
    assert penalised([0], [1, 1], repetition_penalty=2.0) == [1.0, -4.0, 1.0, 0.5, -1.0]
    # below 1 it rewards repetition instead
    assert penalised([0, 4], [], repetition_penalty=0.5) == [4.0, -2.0, 1.0, 0.5, -0.5]


def test_frequency_penalty_subtracts_per_occurrence_in_the_output_only():
    # token 3 is in the prompt only: not penalised; token 2 generated 3 times, token 1 once
    assert penalised([3], [2, 1, 2, 2], frequency_penalty=0.5) == [2.0, -2.5, -0.5, 0.5, -1.0]


def test_presence_penalty_subtracts_once_per_generated_token():
    assert penalised([3], [2, 1, 2, 2], presence_penalty=0.75) == [2.0, -2.75, 0.25, 0.5, -1.0]
    # negative values encourage the generated tokens
    assert penalised([], [4], presence_penalty=-1.0) == [2.0, -2.0, 1.0, 0.5, 0.0]


def test_penalties_combine_repetition_first_then_frequency_and_presence():
    got = penalised([0], [1, 1, 2], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    assert got == [1.0, -5.25, -0.25, 0.5, -1.0]


def test_penalties_are_per_row_and_change_the_greedy_choice():
    logits = torch.tensor([ROW, ROW])
    params = [SamplingParams(temperature=0, presence_penalty=2.0), SamplingParams(temperature=0)]
    tokens, _ = sample_batch(logits, params, None, [[], []], [[0], [0]])
    assert tokens == [2, 0]  # row 0: 2 - 2 = 0 < 1; row 1 has no penalty


def test_logprobs_are_from_the_raw_distribution_not_the_penalised_one():
    logits = torch.tensor([ROW])
    params = [SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=2)]
    tokens, logprobs = sample_batch(logits, params, None, [[]], [[0, 0]])
    raw = torch.log_softmax(logits[0], dim=-1)
    assert tokens == [2]
    assert logprobs[0].token_id == 2 and logprobs[0].logprob == pytest.approx(float(raw[2]))
    assert logprobs[0].top_logprobs == pytest.approx({0: float(raw[0]), 2: float(raw[2])})


def test_min_p_drops_tokens_below_a_fraction_of_the_most_likely():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.12), math.log(0.08)]])
    probs = filtered_probs(logits, [SamplingParams(min_p=0.2)])[0]
    # threshold 0.2 x 0.5 = 0.1: only the 0.08 token goes
    assert probs.tolist() == pytest.approx([0.5, 0.3, 0.12, 0.0])
    generator = torch.Generator().manual_seed(0)
    seen = {sample_batch(logits, [SamplingParams(min_p=0.5)], [generator])[0][0] for _ in range(300)}
    assert seen == {0, 1}  # 0.3 >= 0.25 stays, 0.12 goes
    assert {sample_batch(logits, [SamplingParams(min_p=1.0)], [generator])[0][0] for _ in range(50)} == {0}


def test_top_p_applies_after_top_k_and_min_p():
    logits = torch.tensor([[math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)]])
    # top_k=3 leaves 0.4, 0.3, 0.2 (renormalised 0.444, 0.333, 0.222); top_p 0.7 needs the first two only
    probs = filtered_probs(logits, [SamplingParams(top_k=3, top_p=0.7)])[0]
    assert probs.tolist() == pytest.approx([0.4, 0.3, 0.0, 0.0])


def reference_filter(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row, the plain way: mask scores (min-p, top-k), softmax, then top-p over a full sort."""
    probs = scores.softmax(-1)
    keep = probs >= p.min_p * probs.max()
    if p.top_k:
        keep &= scores >= scores.topk(p.top_k).values[-1]
    probs = torch.where(keep, probs, 0.0)
    if p.top_p >= 1:  # no nucleus: a cumulative sum reaching the total in its last bits must not drop a token
        return probs
    sorted_probs, order = probs.sort(descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs > p.top_p * sorted_probs.sum()
    return torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(drop, 0.0))


def test_filters_match_a_full_sort_including_wide_nuclei():
    torch.manual_seed(1)
    # The window of likely tokens starts at 64 and widens (512, then everything) until each nucleus fits:
    # rows 0 and 3 fit in 64, row 1 needs 512, rows 2 and 4 (nearly flat) the whole vocabulary.
    spreads = [6.0, 2.0, 0.05, 3.0, 0.05, 2.0]
    scores = torch.randn(6, 5000) * torch.tensor(spreads)[:, None]
    params = [
        SamplingParams(top_p=0.3), SamplingParams(top_p=0.5), SamplingParams(top_p=0.9),
        SamplingParams(min_p=0.05, top_p=0.8), SamplingParams(top_k=1000, top_p=0.99), SamplingParams(),
    ]
    got = filtered_probs(scores, params)
    for row, p in enumerate(params):
        assert torch.equal(got[row] > 0, reference_filter(scores[row], p) > 0), row
    kept = (got > 0).sum(dim=1).tolist()
    assert kept[0] < 64 and 64 < kept[1] < 512 and kept[2] > 4000 and kept[3] < 64 and kept[5] == 5000
    assert 512 < kept[4] <= 1000


def test_penalties_match_a_dense_reference_on_random_histories():
    rng = random.Random(3)
    vocab, rows = 50, 5
    logits = torch.randn(rows, vocab)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 8))] for _ in range(rows)]
    outputs = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 30))] for _ in range(rows)]
    outputs[0] = []
    params = [
        SamplingParams(repetition_penalty=rng.choice([1.0, 0.7, 1.3]), frequency_penalty=rng.uniform(-2, 2),
                       presence_penalty=rng.uniform(-2, 2))
        for _ in range(rows)
    ]
    got = apply_penalties(logits, params, prompts, outputs)
    for row, p in enumerate(params):
        expected = logits[row].clone()
        for token in set(prompts[row]) | set(outputs[row]):
            value = expected[token]
            expected[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(outputs[row]):
            count = outputs[row].count(token)
            expected[token] -= p.frequency_penalty * count + p.presence_penalty
        torch.testing.assert_close(got[row], expected)


def test_a_batch_samples_each_row_as_if_it_were_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    params = [
        SamplingParams(seed=1), SamplingParams(temperature=0), SamplingParams(seed=2, top_k=5, temperature=0.7),
        SamplingParams(seed=3, top_p=0.6), SamplingParams(seed=4, min_p=0.1, presence_penalty=1.0),
        SamplingParams(seed=5, repetition_penalty=1.3, top_k=10, top_p=0.9),
    ]
    prompts, outputs = [[1, 2]] * 6, [[3, 3, 4]] * 6
    for _ in range(5):
        together, _ = sample_batch(logits, params, [make_generator(p) for p in params], prompts, outputs)
        alone = [
            sample_batch(logits[i : i + 1], [p], [make_generator(p)], prompts[:1], outputs[:1])[0][0]
            for i, p in enumerate(params)
        ]
        assert together == alone
        logits = logits.roll(1, dims=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_alone_take_the_raw_logits_argmax(dtype):
    """All greedy, no penalties, no logprobs: the argmax of the logits as given (bf16 ones uncopied), the
    same tokens as the general path picks with a logprobs request in the batch."""
    torch.manual_seed(0)
    logits = (torch.randn(5, 300) * 3).to(dtype)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: the first
    greedy = [SamplingParams(temperature=0)] * 5
    tokens, logprobs = sample_batch(logits, greedy)
    assert tokens == logits.float().argmax(dim=-1).tolist() and tokens[2] == 7
    assert logprobs == [None] * 5
    with_logprobs = greedy[:4] + [SamplingParams(temperature=0, logprobs=1)]
    assert sample_batch(logits, with_logprobs)[0] == tokens


@pytest.fixture(scope="module")
def llm(checkpoint):
    path, _ = checkpoint("llama")
    return LLM(str(path), dtype="float32", progress=False)


PROMPT = [5, 17, 42, 99, 7]


def test_n_gives_n_completions_distinct_when_sampling(llm):
    out = llm.generate([PROMPT, [9, 8, 7]], SamplingParams(n=4, temperature=1.0, max_tokens=10, ignore_eos=True))
    assert len(out) == 2
    for request in out:
        assert [c.index for c in request.outputs] == [0, 1, 2, 3]
        assert all(len(c.token_ids) == 10 for c in request.outputs)
        assert len({tuple(c.token_ids) for c in request.outputs}) == 4
    assert out[1].prompt_token_ids == [9, 8, 7]
    assert llm.engine.block_manager.num_used_blocks == 0


def test_n_greedy_completions_are_identical(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True))[0]
    single = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [single.token_ids] * 3
    assert out.token_ids == single.token_ids


def test_n_with_a_seed_uses_seed_plus_i_and_shares_the_prompt_blocks(llm):
    prompt = list(range(10, 50))  # 40 tokens: 2 full blocks of 16 to share
    params = dict(temperature=1.0, max_tokens=6, ignore_eos=True)
    blocks = llm.engine.block_manager
    hits_before = blocks.prefix_hits
    out = llm.generate(prompt, SamplingParams(n=3, seed=100, **params))[0]
    assert blocks.prefix_hits - hits_before == 2 * 2  # completions 1 and 2 reuse both full blocks
    for i, completion in enumerate(out.outputs):
        assert completion.token_ids == llm.generate(prompt, SamplingParams(seed=100 + i, **params))[0].token_ids


def test_seeded_requests_are_reproducible_inside_a_batch_of_others(llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True, frequency_penalty=0.3)
    alone = llm.generate(PROMPT, seeded)[0].token_ids
    rng = random.Random(0)
    others = [[rng.randrange(2, 300) for _ in range(rng.randrange(3, 30))] for _ in range(7)]
    engine = llm.engine
    seqs = [engine.add_request(p, SamplingParams(temperature=1.2, max_tokens=rng.randrange(3, 15), ignore_eos=True))
            for p in others[:4]]
    mine = engine.add_request(PROMPT, seeded)
    seqs += [engine.add_request(p, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, repetition_penalty=1.2))
             for p in others[4:]]
    while engine.has_unfinished():
        engine.step()
    assert mine.output_ids == alone
    assert all(seq.is_finished for seq in seqs)


def test_streaming_refuses_n_above_one(llm):
    with pytest.raises(InvalidRequestError, match="n > 1"):
        next(llm.generation(PROMPT, SamplingParams(n=2)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"), (dict(min_p=float("nan")), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"), (dict(presence_penalty=-2.01), "presence_penalty"),
        (dict(frequency_penalty=3), "frequency_penalty"), (dict(frequency_penalty="1"), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=100.0), "repetition_penalty"),
        (dict(n=0), "n must be"), (dict(n=17), "n must be"), (dict(n=2.0), "n must be"), (dict(n=True), "n must be"),
    ],
)
def test_invalid_new_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_bounds_are_inclusive():
    params = SamplingParams(min_p=1.0, presence_penalty=-2.0, frequency_penalty=2, repetition_penalty=10.0, n=16)
    assert params.n == 16 and params.has_penalties
    assert not SamplingParams().has_penalties
