"""The one place errors become HTTP responses: application/problem+json."""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon

from nixfleet.errors import NixfleetError, StoreUnavailableError
from nixfleet.wire import FieldErrorBody, Problem

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
TYPE_BASE = "https://nixfleet.dev/problems/"


def problem(
    resp: falcon.Response,
    status: int,
    title: str,
    detail: str,
    slug: str,
    errors: list[FieldErrorBody] | None = None,
) -> None:
    body: Problem = {
        "type": TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = errors
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = PROBLEM
    resp.text = json.dumps(body)
    if status == 401:
        resp.set_header("WWW-Authenticate", 'Bearer realm="nixfleet"')


def handle(req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any) -> None:
    if isinstance(ex, NixfleetError):
        problem(
            resp,
            ex.http_status,
            ex.title,
            ex.detail,
            ex.slug,
            [e.to_dict() for e in ex.errors],
        )
        if isinstance(ex, StoreUnavailableError):
            resp.set_header("Retry-After", str(ex.retry_after))
    elif isinstance(ex, falcon.HTTPError):
        status = ex.status_code
        slug = {404: "not-found", 405: "method-not-allowed"}.get(status, "http-error")
        detail = ex.description or (
            f"no route for {req.method} {req.path}; see /api/v1/openapi.json"
            if status == 404
            else ex.title
        )
        problem(resp, status, ex.title or "Error", detail or "error", slug)
        if ex.headers:
            resp.set_headers(ex.headers)
    else:
        log.exception("unhandled error on %s %s", req.method, req.path)
        problem(resp, 500, "Internal error", "the control plane failed; see its log", "internal")


def register(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    app.add_error_handler(Exception, handle)
    app.add_error_handler(falcon.HTTPError, handle)
    app.add_error_handler(NixfleetError, handle)
