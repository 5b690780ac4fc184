"""/openapi.json (and /docs) that describe the real request bodies.

The routes read and validate their bodies themselves (one clear 400 for any bad field, in
OpenAI's error shape), so FastAPI cannot see the body models: they are added here, with the
error body every 4xx/5xx carries, so that clients and fuzzers (schemathesis) get a true schema."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from halserve.server import protocol as P

BODIES = {
    "/v1/completions": P.CompletionRequest,
    "/v1/chat/completions": P.ChatCompletionRequest,
    "/tokenize": P.TokenizeRequest,
    "/detokenize": P.DetokenizeRequest,
}

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible API served by halserve")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps["ErrorResponse"] = ERROR_SCHEMA
        err = {"description": "an OpenAI error body",
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, model in BODIES.items():
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[model.__name__] = js
            op = schema["paths"][path]["post"]
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        for item in schema["paths"].values():
            for op in item.values():
                op.setdefault("responses", {})
                for code in ("400", "401", "404", "413", "500"):
                    op["responses"].setdefault(code, err)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
