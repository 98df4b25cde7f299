"""Dashboard actions run the API's own responders, in process, as the session's key.

A lifecycle change or a rollout pause from the dashboard is then exactly the API's:
the same validation, transition rules, transaction, audit row and history event,
with one implementation to keep right. Only the transport differs: the body is
built here from the form instead of arriving over HTTP, and the permission the
route declares is checked here with the API's own authorize().
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import falcon
import falcon.testing

from nixfleet.api.auth import Actor, authorize
from nixfleet.wire import JSONObject


def call(
    resource: Any,
    method: str,
    actor: Actor,
    body: JSONObject | None = None,
    query: dict[str, str] | None = None,
    **params: str,
) -> Any:
    """resource's responder for method, as actor; returns its JSON answer (resp.media)."""
    authorize(actor, resource.permissions[method], params.get("machine_id"))
    env = falcon.testing.create_environ(
        method=method,
        body=b"" if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        query_string=urlencode(query or {}),
    )
    req = falcon.Request(env)
    req.context.actor = actor
    req.context.enroll_token = None
    resp = falcon.Response()
    getattr(resource, f"on_{method.lower()}")(req, resp, **params)
    return resp.media
