"""POST /v1/embeddings (OpenAI's): each input's embedding from the served generative model, as vLLM serves a
generative model for embeddings — the prompt's final hidden states (after the model's last norm) pooled
and L2-normalized. Pooling is the last token's state by default (vLLM's default for decoder-only models: a
causal model's last position is the only one that has read the whole input), or the mean over every
token with the request's `pooling: "mean"` (an extension). The prompt runs through the engine like any
other request (SamplingParams.pooling; one token is sampled and dropped), batched with the rest.

`encoding_format` "float" or "base64" (little-endian float32, which the official client asks for by
default); `input` a string, a list of strings, a list of token ids or a list of such lists; `dimensions`
only as the model's own width: the hidden states of a model not trained to be truncated (Matryoshka) do
not shorten into meaningful embeddings, so any other value is a 400.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shoal.errors import EngineUnavailableError, GenerationError
from shoal.sampling_params import SamplingParams
from shoal.server.protocol import RequestError, ShortStr, _Strict

MAX_INPUTS = 256  # inputs in one request (OpenAI takes 2048; each is a prompt the engine runs)

NonEmptyText = Annotated[str, StringConstraints(min_length=1)]
NonEmptyIds = Annotated[list[int], Field(min_length=1, max_length=1 << 20)]


class EmbeddingRequest(_Strict):
    union_messages: ClassVar[dict[str, str]] = {"input": (
        f"input must be a non-empty string, a list of 1 to {MAX_INPUTS} non-empty strings, a non-empty list of "
        f"token ids, or a list of 1 to {MAX_INPUTS} such lists")}
    model: ShortStr | None = None
    input: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_INPUTS)] | NonEmptyIds \
        | Annotated[list[NonEmptyIds], Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int | None, Field(ge=1, le=1 << 20)] = None
    user: ShortStr | None = None
    pooling: Literal["last", "mean"] = "last"


def normalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm > 0 else vector


def encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


class EmbeddingServing:
    def __init__(self, serving) -> None:
        self.serving = serving  # the OpenAIServing: its tokenizer, engine, model name and bounds
        self.hidden_size = serving.llm.engine.model.config.hidden_size

    async def embeddings(self, request: Request) -> Response:
        from shoal.server.serving import _Prepared, parse

        req = await parse(EmbeddingRequest, await request.body())
        serving = self.serving
        serving.check_model(req.model)
        if req.dimensions is not None and req.dimensions != self.hidden_size:
            raise RequestError(f"this model's embeddings have {self.hidden_size} dimensions and cannot be shortened "
                               f"to {req.dimensions} (it was not trained for truncated embeddings); leave dimensions "
                               "out", param="dimensions", code="unsupported_parameter")
        if not getattr(serving.llm.engine, "scores_prompts", False):
            raise RequestError("embeddings are not supported on a model split over several devices yet",
                               param="input", code="unsupported_parameter")
        given = req.input
        if isinstance(given, str):
            inputs: list[str | list[int]] = [given]
        elif isinstance(given[0], int):
            inputs = [given]
        else:
            inputs = list(given)
        texts = [t for t in inputs if isinstance(t, str)]
        size = sum(len(t.encode("utf-8")) for t in texts)
        serving._check_prompt_bytes(size)
        for text in texts:
            serving._check_fits_context(len(text.encode("utf-8")))
        params = [SamplingParams(max_tokens=1, temperature=0.0, pooling=req.pooling)]

        def prepare() -> _Prepared:
            ready = []
            for item in inputs:
                ids = serving.tokenizer.encode(item) if isinstance(item, str) else item
                bad = next((t for t in ids if not 0 <= t < serving.vocab_size), None)
                if bad is not None:
                    raise RequestError(f"token id {bad} is outside the vocabulary (0 to {serving.vocab_size - 1})",
                                       param="input")
                serving._check_ids(ids, 1)
                ready.append((None, ids))
            return _Prepared(ready, params)

        prepared = await serving.tokenizer_pool.run(size, prepare)
        request_id, stream = serving._submit("embd", prepared)

        async def work() -> Response:
            vectors: list[list[float] | None] = [None] * len(inputs)
            try:
                async for delta in stream:
                    if delta.embedding is not None:
                        vectors[delta.index] = delta.embedding
            except (EngineUnavailableError, GenerationError) as exc:
                from shoal.server.serving import request_error

                raise request_error(exc) from None
            data = [{"object": "embedding", "index": i, "embedding": encoded(normalized(v), req.encoding_format)}
                    for i, v in enumerate(vectors)]
            tokens = sum(len(ids) for _, ids in prepared.prompts)
            return JSONResponse({"object": "list", "data": data, "model": serving.model_name,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

        return await serving._until_done(request, request_id, stream, work)

