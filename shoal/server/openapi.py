"""/openapi.json: the server's schema, with every route's request body as the pydantic model that bounds it.

The routes read their bodies themselves (serving.parse turns a validation error into an OpenAI error), so
FastAPI cannot see their models; `install_openapi` adds each one, with its bounds (lengths, ranges,
item counts) as JSON Schema, so a client generator or a fuzzer (tests/server/test_fuzz_api.py runs
schemathesis over it) sees the real limits.
"""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF_TEMPLATE = "#/components/schemas/{model}"


def install_openapi(app, bodies: dict[str, type[BaseModel]]) -> None:
    """Make app.openapi() describe `bodies` (route path -> model of its JSON request body)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            models = sorted(set(bodies.values()), key=lambda m: m.__name__)
            refs, definitions = models_json_schema([(m, "validation") for m in models], ref_template=REF_TEMPLATE)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(definitions.get("$defs", {}))
            for path, model in bodies.items():
                operation = schema["paths"][path]["post"]
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": refs[(model, "validation")]}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
