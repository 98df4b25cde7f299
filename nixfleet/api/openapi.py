"""The OpenAPI 3.1 document, generated from the route table and the JSON Schemas.

Generating it from the same table the app routes from means a route cannot exist
without documentation; the test compares the document to Falcon's own router.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from typing import Any

import falcon

from nixfleet import __version__, schemas
from nixfleet.api.auth import Perm
from nixfleet.api.context import Context
from nixfleet.api.params import IntParam
from nixfleet.wire import JSONObject, OpenAPIOperation, OpenAPIParameter

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _rewrite_refs(node: Any, current: str) -> Any:
    """Point JSON Schema $refs (file-relative or local) into components/schemas."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                file, _, pointer = value.partition("#")
                name = file.removesuffix(".schema.json") if file else current
                out[key] = f"#/components/schemas/{name}{pointer}"
            elif key not in ("$schema", "$id"):
                out[key] = _rewrite_refs(value, current)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, current) for v in node]
    return node


def _security(perm: Perm) -> list[dict[str, list[str]]]:
    if perm is Perm.PUBLIC:
        return []
    if perm is Perm.AGENT:
        return [{"machineToken": []}]
    if perm is Perm.ENROLL:
        return [{"enrollToken": []}, {}]  # the token may also travel in the body
    if perm is Perm.AGENT_OR_READONLY:
        return [{"machineToken": []}, {"apiKey": ["readonly"]}]
    return [{"apiKey": [perm.value]}]


def _operation(resource: type[Any], method: str, path: str) -> OpenAPIOperation:
    responder = getattr(resource, f"on_{method.lower()}")
    doc = inspect.getdoc(responder) or inspect.getdoc(resource) or ""
    perm: Perm = resource.permissions[method]
    op: OpenAPIOperation = {
        "operationId": f"{method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', path)}".rstrip("_"),
        "summary": doc.splitlines()[0] if doc else path,
        "security": _security(perm),
        "x-nixfleet-permission": perm.value,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {}}},
            "default": {
                "description": "Error",
                "content": {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                },
            },
        },
    }
    answer = getattr(resource, "answers", {}).get(method)
    if answer:  # what the answer is documented to carry (JSON Schema, other keys allowed)
        op["responses"]["200"]["content"]["application/json"] = {"schema": answer}
    body = getattr(resource, "schemas", {}).get(method)
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    parameters: list[OpenAPIParameter] = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
        for p in re.findall(r"{(\w+)}", path)
    ]
    # Query parameters a resource declares per method: (name, JSON type, description),
    # or an api.params.IntParam (an integer with its range, read by the same object).
    for q in getattr(resource, "query", {}).get(method, []):
        if isinstance(q, IntParam):
            parameters.append(q.openapi())
        else:
            name, kind, text = q
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "schema": {"type": kind},
                    "description": text,
                }
            )
    if parameters:
        op["parameters"] = parameters
    return op


@functools.cache
def schema_components() -> dict[str, JSONObject]:
    from importlib import resources

    names = sorted(
        e.name.removesuffix(".schema.json")
        for e in (resources.files("nixfleet") / "schemas").iterdir()
        if e.name.endswith(".schema.json")
    )
    return {name: _rewrite_refs(schemas.load(name), name) for name in names}


def document(routes: list[tuple[str, type[Any]]]) -> JSONObject:
    paths: dict[str, dict[str, OpenAPIOperation]] = {}
    for path, resource in routes:
        paths[path] = {
            method.lower(): _operation(resource, method, path)
            for method in METHODS
            if hasattr(resource, f"on_{method.lower()}")
        }
    components = {
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "field": {"type": "string"},
                            "message": {"type": "string"},
                            "line": {"type": "integer"},
                        },
                    },
                },
            },
        },
        **schema_components(),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "nixfleet control plane", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "operator API key"},
                "machineToken": {"type": "http", "scheme": "bearer", "description": "agent token"},
                "enrollToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "enrollment token (or `enroll_token` in the body)",
                },
            },
        },
    }


class OpenAPI:
    """The OpenAPI 3.1 document of this API."""

    permissions = {"GET": Perm.PUBLIC}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._text: str | None = None

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The OpenAPI 3.1 document of this API."""
        if self._text is None:
            from nixfleet.api.app import ROUTES

            self._text = json.dumps(document(ROUTES))
        resp.text = self._text
        resp.content_type = falcon.MEDIA_JSON
