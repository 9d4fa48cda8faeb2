"""Request bodies of the OpenAI-compatible API as pydantic models, with a bound on every field.

Strict types (a string where a number belongs is a 400, not a coercion) and unknown fields ignored,
as the OpenAI API does. `sampling_params` turns a request into one SamplingParams per completion.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from shoal.sampling_params import (
    MAX_CHOICE_CHARS,
    MAX_GUIDED_CHOICES,
    MAX_GRAMMAR_BYTES,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MIN_REPETITION_PENALTY,
    SamplingParams,
)

MAX_N = 16  # completions per prompt
MAX_BATCH_PROMPTS = 16  # prompts in one /v1/completions request
MAX_CHOICES = 64  # prompts x n
MAX_MESSAGES = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_TOKENS_FIELD = 1 << 24  # a schema bound; the real bound is the model's context, checked per request
MAX_NAME_CHARS = 256
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# Fields SamplingParams has today: a request that sets one it lacks is refused, never silently ignored.
SUPPORTED_PARAMS = frozenset(f.name for f in dataclasses.fields(SamplingParams))

ShortStr = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_LENGTH)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None
Penalty = Annotated[float | None, Field(ge=-2.0, le=2.0)]
TokenIds = Annotated[list[int], Field(max_length=1 << 20)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    # field -> the message for a value none of its union's forms accepts (pydantic's names one form at random)
    union_messages: ClassVar[dict[str, str]] = {}


class StreamOptions(_Strict):
    include_usage: bool | None = None


GrammarText = Annotated[str, StringConstraints(max_length=MAX_GRAMMAR_BYTES)]


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` request field (shoal.sampling_params.StructuredOutputsParams)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)

    json_schema: dict[str, Any] | GrammarText | None = Field(None, alias="json")
    regex: GrammarText | None = None
    choice: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHOICE_CHARS)]] | None,
                      Field(min_length=1, max_length=MAX_GUIDED_CHOICES)] = None
    grammar: GrammarText | None = None
    json_object: bool | None = None


class _Sampling(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then vLLM's extras)."""

    model: ShortStr | None = None
    n: Annotated[int | None, Field(ge=1, le=MAX_N)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    stop: Stop = None
    seed: Annotated[int | None, Field(ge=INT64_MIN, le=INT64_MAX)] = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: Annotated[dict[str, float] | None, Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] = None
    user: ShortStr | None = None
    # vLLM extras
    top_k: Annotated[int | None, Field(ge=-1, le=1 << 20)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    repetition_penalty: Annotated[float | None, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)] = None
    ignore_eos: bool | None = None
    stop_token_ids: Annotated[list[int] | None, Field(max_length=MAX_STOP_TOKEN_IDS)] = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    # structured outputs, vLLM's spellings (shoal.server.structured reads them)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | GrammarText | None = None
    guided_regex: GrammarText | None = None
    guided_choice: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHOICE_CHARS)]] | None,
                             Field(min_length=1, max_length=MAX_GUIDED_CHOICES)] = None
    guided_grammar: GrammarText | None = None
    guided_decoding_backend: ShortStr | None = None  # accepted and ignored: shoal has one backend (llguidance)


class CompletionRequest(_Sampling):
    union_messages: ClassVar[dict[str, str]] = {
        "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of such lists"}
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)
    ]
    # < 1 is refused with a clear message, but for 0 with echo: the prompt alone, scored (evaluation harnesses)
    max_tokens: Annotated[int | None, Field(le=MAX_TOKENS_FIELD)] = None
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    echo: bool | None = None
    best_of: Annotated[int | None, Field(ge=1, le=MAX_N)] = None
    suffix: Annotated[str | None, StringConstraints(max_length=MAX_NAME_CHARS)] = None


class ContentPart(_Strict):
    type: ShortStr
    text: str | None = None


MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
MAX_TEMPLATE_KWARGS = 64
MAX_DOCUMENTS = 64
# What a template is rendered with already; chat_template_kwargs may not set these.
RESERVED_TEMPLATE_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class FunctionCall(_Strict):
    name: ShortStr
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; some clients send the object


class ToolCall(_Strict):
    id: ShortStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: ShortStr | None = None
    tool_calls: Annotated[list[ToolCall] | None, Field(max_length=MAX_TOOL_CALLS)] = None
    tool_call_id: ShortStr | None = None
    reasoning_content: str | None = None  # earlier turns' reasoning, for templates that show it


class FunctionDefinition(_Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: ShortStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)

    name: ShortStr | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int | None, Field(le=MAX_TOKENS_FIELD)] = None
    max_completion_tokens: Annotated[int | None, Field(le=MAX_TOKENS_FIELD)] = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    tools: Annotated[list[Tool] | None, Field(max_length=MAX_TOOLS)] = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Annotated[dict[str, Any] | None, Field(max_length=MAX_TEMPLATE_KWARGS)] = None
    documents: Annotated[list[dict[str, Any]] | None, Field(max_length=MAX_DOCUMENTS)] = None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or a chat (rendered with its template first)."""

    model: ShortStr | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage] | None, Field(min_length=1, max_length=MAX_MESSAGES)] = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for a chat (its template places them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Annotated[dict[str, Any] | None, Field(max_length=MAX_TEMPLATE_KWARGS)] = None
    tools: Annotated[list[Tool] | None, Field(max_length=MAX_TOOLS)] = None
    documents: Annotated[list[dict[str, Any]] | None, Field(max_length=MAX_DOCUMENTS)] = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: ShortStr | None = None
    tokens: TokenIds


class RequestError(Exception):
    """A request the server refuses, rendered as an OpenAI error body with this HTTP status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _unsupported(param: str, why: str = "is not supported by this server") -> RequestError:
    return RequestError(f"{param} {why}", param=param, code="unsupported_parameter")


# Penalties and filters whose neutral value needs no support; any other value needs the SamplingParams field.
_NEUTRAL = {"min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias (token id as a string -> bias in [-100, 100]) as SamplingParams takes it."""
    if not bias:
        return None
    parsed = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise RequestError(f"logit_bias keys are token ids from 0 to {vocab_size - 1}, got {key[:32]!r}",
                               param="logit_bias")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise RequestError(f"logit_bias values lie in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value!r} "
                               f"for token {key}", param="logit_bias")
        parsed[int(key)] = float(value)
    return parsed


def sampling_params(
    request: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None,
    vocab_size: int, prompt_logprobs: int | None = None,
) -> list[SamplingParams]:
    """One SamplingParams per completion (n of them); with a seed, completion i samples with seed + i."""
    options: dict[str, Any] = {"logit_bias": logit_bias(request.logit_bias, vocab_size),
                               "prompt_logprobs": prompt_logprobs}
    for name, neutral in _NEUTRAL.items():
        value = getattr(request, name)
        if value is None or value == neutral:
            continue
        if name not in SUPPORTED_PARAMS:
            raise _unsupported(name, "is not supported by this server yet")
        options[name] = value
    for name in ("top_k", "ignore_eos", "stop_token_ids", "skip_special_tokens"):
        value = getattr(request, name)
        if value is not None:
            options[name] = value
    stop = request.stop if request.stop is not None else []
    n = request.n or 1
    params = []
    for i in range(n):
        seed = request.seed + i if request.seed is not None else None
        params.append(
            SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                seed=seed,
                stop=[stop] if isinstance(stop, str) else list(stop),
                logprobs=logprobs,
                **options,
            )
        )
    return params


def stream_usage(request: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(request.stream and request.stream_options and request.stream_options.include_usage)

