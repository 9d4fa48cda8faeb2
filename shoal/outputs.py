"""What generation returns: one RequestOutput per prompt, holding its completions (vLLM's shape)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] = field(default_factory=dict)  # the K most likely ids -> logprob
    rank: int | None = None  # 1 + how many ids are more likely (set for prompt logprobs, as vLLM reports it)


@dataclass
class CompletionOutput:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, stop string or stop token) or "length"
    logprobs: list[TokenLogprob] | None = None  # under the raw model distribution, before penalties and filters
    index: int = 0  # which of the prompt's n completions this is


@dataclass
class RequestOutput:
    """One prompt's result: `outputs` holds its n completions (SamplingParams.n), in order of index;
    token_ids, text and finish_reason are the first completion's."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # With SamplingParams.pooling: the prompt's pooled final hidden state (float32, not normalized).
    embedding: list[float] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason
