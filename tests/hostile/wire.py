"""Raw HTTP against a real control plane, for the hostile-world tests (issue 14)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = None,
    content_type: str = "application/json",
    timeout: float = 30.0,
) -> Answer:
    """One request as bytes: what an attacker controls, the client library does not add."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Content-Type": content_type} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def send(url: str, method: str, path: str, doc: Any, token: str | None) -> Answer:
    """A JSON body, escaped the way json.dumps escapes (lone surrogates become \\udXXX)."""
    return raw(url, method, path, json.dumps(doc).encode(), token)
