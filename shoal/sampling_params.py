"""SamplingParams: how one request picks its tokens and when it stops; validated once, on creation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from shoal.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_N = 16
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY], as in the OpenAI API
MAX_REPETITION_PENALTY = 10.0
# Below these the float32 logits overflow (x / 1e-46 is Inf, and Inf - Inf is NaN): a temperature in
# (0, MIN_TEMPERATURE) samples at MIN_TEMPERATURE (as vLLM does), a smaller repetition penalty is refused.
MIN_TEMPERATURE = 0.01
MIN_REPETITION_PENALTY = 0.01
MAX_LOGIT_BIAS = 100.0  # each bias lies in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS], as in the OpenAI API
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_GRAMMAR_BYTES = 64 * 1024  # a JSON schema, regex or grammar, as text
MAX_GUIDED_CHOICES = 256  # strings a guided_choice may list
MAX_CHOICE_CHARS = 1024
MAX_START_AFTER_CHARS = 64
POOLINGS = (None, "last", "mean")  # SamplingParams.pooling: the prompt's hidden states pooled into an embedding


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a completion must match, enforced while sampling (vLLM's StructuredOutputsParams): exactly one of
    `json` (a JSON schema, as a dict or its text), `json_object` (any JSON object), `regex`, `choice` (one of
    these strings) or `grammar` (a Lark grammar, llguidance's dialect). `whitespace_flexible` lets JSON hold
    any whitespace between tokens; off by default, so a sampled reply cannot wander into endless blanks.
    `start_after` leaves the reply free until it has written this text, and constrains only what follows:
    a reasoning model's "</think>", so that it thinks first and then answers in the grammar (vLLM's
    structured outputs with a reasoning parser); None constrains from the first token.
    Compiled by shoal.engine.grammar when the request is added; a schema or grammar it cannot compile is an
    InvalidRequestError then."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    whitespace_flexible: bool = False
    start_after: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequestError(
                "structured outputs take exactly one of json, json_object, regex, choice or grammar"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if self.choice is not None and not (
            0 < len(self.choice) <= MAX_GUIDED_CHOICES
            and all(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS for c in self.choice)
        ):
            raise InvalidRequestError(f"choice takes 1 to {MAX_GUIDED_CHOICES} strings of 1 to {MAX_CHOICE_CHARS} characters")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidRequestError(f"{name} must be a string")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidRequestError("json must be a JSON schema: an object, or its text")
        if self.start_after is not None and not (
            isinstance(self.start_after, str) and 0 < len(self.start_after) <= MAX_START_AFTER_CHARS
        ):
            raise InvalidRequestError(f"start_after takes a text of 1 to {MAX_START_AFTER_CHARS} characters (the "
                                      "marker the constraint waits for, such as '</think>'), or None")
        if self.size() > MAX_GRAMMAR_BYTES:
            kind = {"json": "JSON schema", "choice": "list of choices"}.get(given[0], given[0])
            raise InvalidRequestError(
                f"the {kind} is {self.size()} bytes; at most {MAX_GRAMMAR_BYTES} are taken — simplify it"
            )

    def size(self) -> int:
        """Bytes of the constraint's text (a schema as compact JSON)."""
        if isinstance(self.json, dict):
            return len(json.dumps(self.json, separators=(",", ":")).encode())
        text = self.json if isinstance(self.json, str) else self.regex or self.grammar or ""
        return len(text.encode()) + sum(len(c.encode()) for c in self.choice or ())

    def key(self) -> tuple:
        """A hashable identity (the cache key of its compiled grammar, which start_after does not change)."""
        schema = json.dumps(self.json, sort_keys=True) if isinstance(self.json, dict) else self.json
        return (schema, self.json_object, self.regex, self.choice, self.grammar, self.whitespace_flexible)


@dataclass
class SamplingParams:
    """Field names and defaults follow vLLM and the OpenAI API.

    temperature 0 means greedy, one in (0, 0.01) samples at 0.01; top_k 0 (or -1), top_p 1.0 and min_p 0
    disable those filters; seed makes sampling reproducible per request (the same tokens for the same
    batch; see shoal.layers.sampler for why a different batch may differ); logprobs=K returns each generated token's logprob and the top K
    alternatives, under the raw model distribution (before penalties, temperature and filters).

    Penalties change the logits before temperature: repetition_penalty (HF and vLLM; 1.0 is off) divides
    the positive logits and multiplies the negative ones of every token in the prompt or the output;
    frequency_penalty subtracts penalty x count and presence_penalty subtracts the penalty once, for each
    token generated so far (OpenAI). n asks for n completions of the prompt (`LLM.generate`); with a
    seed, completion i samples with seed + i.

    logit_bias (OpenAI) adds a bias to chosen token ids' logits before sampling (greedy too); logprobs
    stay those of the raw model. prompt_logprobs=K (vLLM) returns, for every prompt token but the first,
    its logprob given the tokens before it and the top K alternatives (evaluation harnesses' loglikelihood).
    pooling ("last" or "mean") pools the prompt's final hidden states (after the last norm) into
    RequestOutput.embedding: the last token's, or the mean over every prompt token (/v1/embeddings).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    logit_bias: dict[int, float] | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    pooling: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = dict(self.logit_bias) or None
        if _number(self.temperature) and 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (_number(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0, got {self.temperature!r}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be 0 or -1 (off) or a positive integer, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings are allowed"),
            (all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in self.stop),
             f"each stop string must be 1 to {MAX_STOP_LENGTH} characters"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be between 0 and {MAX_LOGPROBS}"),
            (_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}"),
            (_number(self.presence_penalty) and -MAX_PENALTY <= self.presence_penalty <= MAX_PENALTY,
             f"presence_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {self.presence_penalty!r}"),
            (_number(self.frequency_penalty) and -MAX_PENALTY <= self.frequency_penalty <= MAX_PENALTY,
             f"frequency_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {self.frequency_penalty!r}"),
            (_number(self.repetition_penalty)
             and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}], "
             f"got {self.repetition_penalty!r}"),
            (_integer(self.n) and 1 <= self.n <= MAX_N, f"n must be an integer from 1 to {MAX_N}, got {self.n!r}"),
            (self.prompt_logprobs is None or (_integer(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}"),
            (self.pooling in POOLINGS, f"pooling must be one of {', '.join(map(str, POOLINGS))}, got {self.pooling!r}"),
            (_logit_bias_ok(self.logit_bias),
             f"logit_bias maps at most {MAX_LOGIT_BIAS_ENTRIES} token ids (integers >= 0) to numbers in "
             f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
        ]
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidRequestError("structured_outputs must be a StructuredOutputsParams")
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _logit_bias_ok(bias: dict | None) -> bool:
    if bias is None:
        return True
    return len(bias) <= MAX_LOGIT_BIAS_ENTRIES and all(
        _integer(t) and t >= 0 and _number(v) and abs(v) <= MAX_LOGIT_BIAS for t, v in bias.items()
    )


def _number(value) -> bool:
    # bool is an int in Python, and NaN passes no bound check: both are rejected here.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
