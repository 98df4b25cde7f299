"""HTTP client shared by the CLI and the agent.

Problem+json responses become the matching NixfleetError subclass, and a control
plane that cannot be reached becomes UnreachableError, so callers never see
urllib's exceptions.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from nixfleet import __version__
from nixfleet.errors import BY_SLUG, FieldError, NixfleetError, UnreachableError

USER_AGENT = f"nixfleet/{__version__}"


class Client:
    """A small keep-alive JSON client for one control plane."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        parsed = urllib.parse.urlsplit(base_url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UnreachableError(
                f"invalid control plane URL {base_url!r}: expected http(s)://HOST[:PORT]"
            )
        self.base_url = base_url.rstrip("/")
        self._scheme = parsed.scheme
        self._host = parsed.hostname
        self._port = parsed.port
        self._prefix = parsed.path
        self._token = token
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (
                http.client.HTTPSConnection
                if self._scheme == "https"
                else http.client.HTTPConnection
            )
            self._conn = cls(self._host, self._port, timeout=self._timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, str | Sequence[str] | None] | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON (None for 204)."""
        url = self._prefix + path
        if params:
            pairs = [
                (k, v)
                for k, vs in params.items()
                if vs is not None
                for v in ([vs] if isinstance(vs, str) else vs)
            ]
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        status, raw, ctype = self._send(method, url, data, headers)
        if status == 204 or not raw:
            if status >= 400:
                raise _error_for(status, {}, self.base_url)
            return None
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"detail": raw[:200].decode(errors="replace")}
        if status >= 400 or "problem+json" in ctype:
            raise _error_for(status, payload, self.base_url)
        return payload

    def _send(
        self, method: str, url: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes, str]:
        # One retry covers a keep-alive connection the server closed while we were idle.
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, url, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return resp.status, raw, resp.getheader("Content-Type", "")
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if attempt == 2:
                    raise UnreachableError(
                        f"control plane at {self.base_url} closed the connection: {e}"
                    ) from e
            except (TimeoutError, OSError, http.client.HTTPException) as e:
                self.close()
                raise UnreachableError(
                    f"control plane at {self.base_url} is unreachable: {e}"
                ) from e
        raise AssertionError("unreachable")  # pragma: no cover

    # Convenience wrappers used by several callers.
    def get(self, path: str, **params: str | Sequence[str] | None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def report(self, machine_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The agent's one round trip per poll."""
        result: dict[str, Any] = self.request(
            "POST", f"/api/v1/machines/{urllib.parse.quote(machine_id, safe='')}/report", body
        )
        return result

    def webhook_deliveries(self, failed: bool = False, limit: int = 100) -> dict[str, Any]:
        """GET /api/v1/webhooks/deliveries (admin)."""
        result: dict[str, Any] = self.get(
            "/api/v1/webhooks/deliveries", failed="true" if failed else None, limit=str(limit)
        )
        return result


def _error_for(status: int, payload: Mapping[str, Any], base_url: str) -> NixfleetError:
    slug = str(payload.get("type", "")).rsplit("/", 1)[-1]
    cls = BY_SLUG.get(slug)
    if cls is None:
        cls = next((c for c in BY_SLUG.values() if c.http_status == status), NixfleetError)
        if status in (502, 503, 504):
            cls = UnreachableError
    detail = str(payload.get("detail") or payload.get("title") or f"HTTP {status}")
    errors = [
        FieldError(str(e.get("field", "")), str(e.get("message", "")), e.get("line"))
        for e in payload.get("errors", []) or []
        if isinstance(e, Mapping)
    ]
    return cls(detail, errors=errors)
