"""Speculative decoding: with an n-gram draft (Llama) or DeepSeek's MTP module (a tiny DeepSeek-V3 with a
random MTP layer), greedy tokens are exactly those of plain decoding — alone, in a batch of 32 with mixed
lengths, with preemption — and every KV block is free afterwards; rejection sampling keeps the target's
distribution (a chi-square test that a broken sampler fails)."""

from __future__ import annotations

import random

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.errors import ConfigError
from shoal.layers.paged_kv_cache import PagedKVCache
from shoal.layers.sampler import inverse_cdf, rejection_sample


def repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts of 3 to 60 tokens that repeat pieces of themselves, so prompt lookup finds matches."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        piece = [rng.randrange(2, 300) for _ in range(rng.randrange(2, 8))]
        prompt = [rng.randrange(2, 300) for _ in range(rng.randrange(1, 10))]
        while len(prompt) < rng.randrange(3, 60):
            prompt += piece if rng.random() < 0.6 else [rng.randrange(2, 300)]
        out.append(prompt)
    return out


def params_for(batch: list[list[int]]) -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=4 + 4 * (i % 4), ignore_eos=True) for i in range(len(batch))]


CASES = [("llama", "ngram", 4), ("deepseek-v3-mtp", "mtp", 2)]


@pytest.mark.parametrize("name,method,k", CASES)
def test_speculative_greedy_tokens_equal_plain_decoding_alone_and_in_a_batch_of_32(checkpoint, name, method, k):
    path, _ = checkpoint(name)
    plain = LLM(str(path), dtype="float32", progress=False)
    spec = LLM(str(path), dtype="float32", progress=False, speculative=method, num_speculative_tokens=k,
               speculative_max_batch=None)  # draft at every batch size: the batch of 32 carries drafts too
    batch = repetitive_prompts(32)
    params = params_for(batch)
    expected = [out.token_ids for out in plain.generate(batch, params)]
    assert [out.token_ids for out in spec.generate(batch, params)] == expected
    for i in (0, 5, 31):  # alone: no other sequence in the steps
        assert spec.generate(batch[i], params[i])[0].token_ids == expected[i]
    stats = spec.engine.speculation
    assert stats.num_drafts > 20 and stats.num_accepted_tokens > 0
    assert spec.engine.block_manager.num_used_blocks == 0


def test_prompt_lookup_proposes_the_longest_latest_match_and_continues_a_loop():
    from shoal.engine.speculative import NgramDraft

    draft = NgramDraft(min_n=1, max_n=4)
    assert draft.lookup([1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]  # latest occurrence of [1, 2, 3]
    assert draft.lookup([5, 6, 7, 5, 6, 7, 5], 4) == [6, 7, 5, 6]  # runs into the end: copies on, period 3
    assert draft.lookup([8, 4, 4, 4], 3) == [4, 4, 4]  # a one-token loop: k tokens, not one
    assert draft.lookup([1, 2, 3], 3) == [] and draft.lookup([1, 2, 1], 0) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verification_and_mtp_steps_are_replayed_like_decode_steps(dtype):
    """A verification step lays each draft token out as a row of its own (one token per row), and the MTP
    module runs over the step's own rows: both are decode steps the CPU backend records and replays.
    The bundled demo model (DeepSeek-V3 with a trained MTP layer), batch 1, k = 1 and 2."""
    from shoal.backends.cpu import experts, fused

    if not (fused.available() and experts.available()):
        pytest.skip("the CPU kernels cannot be built here (no C compiler), so nothing is replayed")
    prompt = "The os module provides a portable way of using operating system dependent functionality."
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = LLM(dtype=dtype, progress=False).generate(prompt, params)[0].token_ids
    for k in (1, 2):
        spec = LLM(dtype=dtype, progress=False, speculative="mtp", num_speculative_tokens=k)
        assert spec.generate(prompt, params)[0].token_ids == expected
        model = spec.engine.model
        target, mtp = model._step_graphs, model._mtp_graphs
        if dtype == "float32" and not target:
            pytest.skip("float32 decode steps are not recorded here (no packed MKL sgemm)")
        assert target.replays[k + 1] > 0, (dict(target.replays), target.refused)  # verifications: k + 1 rows
        assert sum(mtp.replays.values()) > 0, (dict(mtp.replays), mtp.refused)


@pytest.mark.parametrize("name,method", [("llama", "ngram"), ("deepseek-v3-mtp", "mtp")])
def test_speculative_greedy_tokens_survive_preemption_and_prefix_caching(checkpoint, name, method):
    path, _ = checkpoint(name)
    batch = repetitive_prompts(12, seed=1)
    batch += [batch[0] + batch[1][:5], batch[0] + batch[2][:3]]  # shared prefixes for the prefix cache
    params = params_for(batch)
    plain = LLM(str(path), dtype="float32", progress=False)
    expected = [out.token_ids for out in plain.generate(batch, params)]
    layers = plain.model.config.num_hidden_layers + (method == "mtp")  # the MTP module's own cache layer
    per_block = PagedKVCache.bytes_per_block(layers, plain.engine.block_manager.block_size,
                                             plain.model.cache_entry_shapes(), torch.float32, None)
    spec = LLM(str(path), dtype="float32", progress=False, speculative=method, num_speculative_tokens=3,
               kv_cache_memory=per_block * 12, speculative_max_batch=None)
    assert spec.engine.block_manager.num_blocks == 12  # 192 tokens for 14 sequences of up to 76
    assert [out.token_ids for out in spec.generate(batch, params)] == expected
    assert spec.engine.scheduler.num_preemptions > 0
    assert spec.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("name,method", [("llama", "ngram"), ("deepseek-v3-mtp", "mtp")])
def test_no_drafts_past_speculative_max_batch_and_the_same_tokens(checkpoint, name, method):
    """Past speculative_max_batch running sequences nobody drafts (nor does the MTP module run); once the
    batch shrinks to it, drafting resumes; the tokens are plain decoding's throughout."""
    path, _ = checkpoint(name)
    batch = repetitive_prompts(6, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=6 + 8 * (i == 0), ignore_eos=True) for i in range(6)]
    expected = [out.token_ids for out in LLM(str(path), dtype="float32", progress=False).generate(batch, params)]
    spec = LLM(str(path), dtype="float32", progress=False, speculative=method, speculative_max_batch=2)
    drafted_at = []
    step = spec.engine.runner.step

    def counting(chunks):
        drafted_at.append((len(spec.engine.scheduler.running), sum(bool(c.draft) for c in chunks)))
        return step(chunks)

    spec.engine.runner.step = counting
    assert [out.token_ids for out in spec.generate(batch, params)] == expected
    assert all(drafts == 0 for running, drafts in drafted_at if running > 2)
    assert any(drafts > 0 for running, drafts in drafted_at if running <= 2)  # the long one, left alone
    with pytest.raises(Exception, match="speculative_max_batch"):
        LLM(str(path), progress=False, speculative=method, speculative_max_batch=0)


def test_stop_strings_max_tokens_and_n_with_a_draft(checkpoint):
    path, _ = checkpoint("llama")
    prompt = repetitive_prompts(1, seed=2)[0]
    params = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, n=2)
    plain = LLM(str(path), dtype="float32", progress=False).generate(prompt, params)[0]
    spec = LLM(str(path), dtype="float32", progress=False, speculative="ngram")
    got = spec.generate(prompt, params)[0]
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in plain.outputs]
    assert all(len(o.token_ids) == 17 for o in got.outputs)
    stop = plain.outputs[0].text[4:7]
    if stop.strip():
        stopped = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, stop=[stop])
        want = LLM(str(path), dtype="float32", progress=False).generate(prompt, stopped)[0].outputs[0]
        assert spec.generate(prompt, stopped)[0].outputs[0].text == want.text


def test_sampled_speculative_decoding_runs_and_counts_acceptance(checkpoint):
    path, _ = checkpoint("deepseek-v3-mtp")
    spec = LLM(str(path), dtype="float32", progress=False, speculative="mtp", num_speculative_tokens=2)
    outs = spec.generate(repetitive_prompts(2, seed=3), SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True,
                                                                      seed=7, logprobs=1))
    for out in outs:
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 12 and all(0 <= t < spec.model_config.vocab_size for t in tokens)
        assert [lp.token_id for lp in out.outputs[0].logprobs] == tokens
    stats = spec.engine.speculation
    assert stats.num_draft_tokens > 0 and 0 <= stats.acceptance_rate <= 1


def test_mtp_is_refused_clearly_for_a_model_without_mtp_weights(checkpoint):
    with pytest.raises(ConfigError, match="speculative ngram"):
        LLM(str(checkpoint("llama")[0]), progress=False, speculative="mtp")
    with pytest.raises(ConfigError, match="no MTP weights"):
        LLM(str(checkpoint("deepseek-v3")[0]), progress=False, speculative="mtp")


# ---- the rejection sampler's distribution -------------------------------------------------------------

def _broken_rejection_sample(probs, draft, uniforms):
    """A wrong sampler (it redraws from p itself after a rejection, not from p with the draft removed)."""
    j = 0
    if float(uniforms[0]) < float(probs[0, draft[0]]):
        return [draft[0]]
    return [int(inverse_cdf(probs[j][None], torch.rand(1, dtype=torch.float64))[0])]


# Chi-square critical value for 7 degrees of freedom at p = 0.001 (a vocabulary of 8).
CHI2_7_AT_0_001 = 24.32


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("sampler,passes", [(rejection_sample, True), (_broken_rejection_sample, False)])
def test_rejection_sampling_keeps_the_target_distribution(sampler, passes):
    """Temperature 1 over a vocabulary of 8, a draft of two likely tokens: the first emitted token follows
    p_0 and, after an accepted first draft, the second follows p_1 (chi-square at p = 0.001); the broken
    sampler must fail."""
    torch.manual_seed(0)
    vocab, trials = 8, 6000
    probs = torch.softmax(torch.randn(3, vocab, dtype=torch.float64) * 1.5, dim=-1)
    draft = [int(probs[0].argmax()), int(probs[1].argmax())]
    first, second = torch.zeros(vocab, dtype=torch.float64), torch.zeros(vocab, dtype=torch.float64)
    for _ in range(trials):
        out = sampler(probs, draft, torch.rand(3, dtype=torch.float64))
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    assert (_chi_square(first, probs[0]) < CHI2_7_AT_0_001) is passes
    if passes:
        assert second.sum() > trials * probs[0, draft[0]] * 0.9
        assert _chi_square(second, probs[1]) < CHI2_7_AT_0_001


def test_acceptance_figures_reach_metrics_and_shoal_bench(checkpoint, tmp_path, capsys):
    import argparse
    import json

    from shoal.bench import add_bench_parser, cmd_bench
    from shoal.engine.async_engine import EngineStats
    from shoal.engine.speculative import SpeculationStats
    from shoal.server.metrics import ServerMetrics

    stats = SpeculationStats()
    for drafted, accepted in [(3, 3), (3, 1), (2, 0), (3, 2)]:
        stats.record(drafted, accepted)
    assert stats.acceptance_rate == pytest.approx(6 / 11)
    assert stats.mean_accepted_length == pytest.approx(1 + 6 / 4)
    assert stats.acceptance_per_position() == [0.75, 0.5, 0.25]
    text = ServerMetrics("m").render(EngineStats(speculation=stats))
    assert 'shoal_spec_decode_num_draft_tokens_total{model_name="m"} 11' in text
    assert 'shoal_spec_decode_acceptance_rate{model_name="m"} 0.545' in text
    assert 'shoal_spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"} 1' in text
    assert "shoal_spec_decode" not in ServerMetrics("m").render(EngineStats())

    parser = argparse.ArgumentParser(prog="shoal")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "--model", str(checkpoint("llama")[0]), "--dtype", "float32", "--num-prompts",
                              "3", "--input-len", "9", "--output-len", "12", "--speculative", "ngram",
                              "--num-speculative-tokens", "2", "--json-out", str(out)])
    assert cmd_bench(args) == 0
    assert "Speculative (ngram): acceptance rate" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["output_tokens"] == 36
    assert 0 <= result["spec_num_accepted_tokens"] <= result["spec_num_draft_tokens"] <= 2 * result["spec_num_drafts"]
