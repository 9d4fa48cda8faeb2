"""Structured outputs as clients ask for them: OpenAI's `response_format` (json_object, json_schema) and vLLM's
`structured_outputs` / `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, read into one
StructuredOutputsParams per request (enforced while sampling: shoal.engine.grammar), each mistake a 400
that names its field."""

from __future__ import annotations

from shoal.errors import InvalidRequestError
from shoal.sampling_params import StructuredOutputsParams
from shoal.server.protocol import ChatCompletionRequest, CompletionRequest, RequestError

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _params(param: str, **fields) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except InvalidRequestError as exc:
        raise RequestError(str(exc), param=param) from None


def requested(req: CompletionRequest | ChatCompletionRequest) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint and the field that set it (None, None when it has none); more than one is a 400."""
    found: list[tuple[StructuredOutputsParams, str]] = []
    response_format = getattr(req, "response_format", None)
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append((_params("response_format", json_object=True), "response_format"))
        else:
            spec = response_format.json_schema
            if spec is None or spec.json_schema is None:
                raise RequestError("response_format json_schema needs json_schema.schema: the JSON schema the reply "
                                   "must match", param="response_format")
            schema = closed_objects(spec.json_schema) if spec.strict else spec.json_schema
            found.append((_params("response_format", json=schema), "response_format"))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        found.append((_params("structured_outputs", json=so.json_schema, json_object=bool(so.json_object),
                              regex=so.regex, choice=so.choice, grammar=so.grammar), "structured_outputs"))
    for name in _GUIDED:
        value = getattr(req, name)
        if value is not None:
            field = name.removeprefix("guided_")
            found.append((_params(name, **{field: value}), name))
    if len(found) > 1:
        raise RequestError(f"{' and '.join(n for _, n in found)} each constrain the reply; give only one",
                           param=found[1][1])
    return found[0] if found else (None, None)


def compile_or_400(grammars, spec: StructuredOutputsParams, param: str) -> None:
    """Compile `spec` now (in the request's thread, so the engine only copies it); a bad one is a 400."""
    try:
        grammars.compile(spec)
    except InvalidRequestError as exc:
        raise RequestError(str(exc), param=param) from None


def closed_objects(schema):
    """`schema` with every object that does not say otherwise closed (additionalProperties false), as OpenAI's
    strict mode asks of a schema: a sampled reply then cannot invent keys until max_tokens cuts it."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        elif key in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "additionalProperties"):
            out[key] = closed_objects(value)
        else:
            out[key] = value
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
