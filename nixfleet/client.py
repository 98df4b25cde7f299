"""The typed HTTP client of the control plane, shared by the CLI, the agent and the demo.

One method per API operation, each returning the wire shape of `nixfleet.wire`; no
caller builds a URL or a body. Everything that can go wrong on the way becomes a
NixfleetError, never urllib's or ssl's exceptions:

- problem+json answers become the matching subclass (NotFoundError, …);
- a control plane that cannot be reached, or does not answer within the deadline,
  is UnreachableError (the CLI's "control plane is down" guidance, exit 5);
- something that answers but is not the nixfleet API (a web server, plain HTTP on an
  https:// URL, TLS on an http:// one, a body that is not the documented JSON
  object) is ProtocolError, one line saying what was reached.

Every exchange has one TOTAL deadline (`timeout`), not one per read: a server that
dribbles a byte every few seconds cannot hold a caller past it.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, cast

import orjson

from nixfleet import __version__, deadline_http, gcpause, wire
from nixfleet.errors import (
    BY_SLUG,
    FieldError,
    NixfleetError,
    ProtocolError,
    UnreachableError,
    UsageError,
)
from nixfleet.filters import MachineFilter

USER_AGENT = f"nixfleet/{__version__}"
MAX_RESPONSE_BYTES = 256 * 2**20  # the status of 100,000 machines is ~40 MiB
TLS_HANDSHAKE_SECONDS = 5.0  # a handshake takes milliseconds; silence means no TLS server

Params = Mapping[str, str | Sequence[str] | None]
T = TypeVar("T")


def check_url(url: str) -> urllib.parse.SplitResult:
    """The parsed URL, or a UsageError naming the fix (a missing scheme is the usual slip)."""
    if "://" not in url:
        raise UsageError(
            f"control plane URL {url!r} has no scheme: use http://{url} "
            f"(or https://{url} behind TLS)"
        )
    parsed = urllib.parse.urlsplit(url.rstrip("/"))
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise UsageError(f"control plane URL {url!r} has an invalid port") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(
            f"control plane URL {url!r}: expected http://HOST[:PORT] or https://HOST[:PORT]"
        )
    return parsed


class Client:
    """A keep-alive JSON client for one control plane; `timeout` bounds each exchange."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        parsed = check_url(base_url)
        self.base_url = base_url.rstrip("/")
        self._scheme = parsed.scheme
        self._host = parsed.hostname or ""
        self._port = parsed.port
        self._prefix = parsed.path
        self._token = token
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    # --- transport ------------------------------------------------------------------

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, body: Any = None, params: Params | None = None
    ) -> Any:
        """Send one request; return the decoded JSON (None for an empty answer)."""
        url = self._prefix + path
        pairs = [
            (k, v)
            for k, vs in (params or {}).items()
            if vs is not None
            for v in ([vs] if isinstance(vs, str) else vs)
        ]
        if pairs:
            url += "?" + urllib.parse.urlencode(pairs)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        data = None
        if body is not None:
            data = encode(body)
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        what = f"{method} {path}"
        status, raw, ctype = self._send(method, url, data, headers, what)
        json_type = "json" in ctype
        if status in (502, 503, 504) and not json_type:
            raise UnreachableError(
                f"{self.base_url} answered HTTP {status}: a proxy in front of the control "
                "plane cannot reach it"
            )
        if not raw:
            if status >= 400:
                raise _error_for(status, {})
            return None
        if not json_type:
            raise ProtocolError(
                f"{self.base_url} is not a nixfleet control plane: {what} answered "
                f"HTTP {status} {ctype or 'without a content type'} ({_snippet(raw)})"
            )
        try:
            payload = _parse(raw)
        except ValueError:
            raise ProtocolError(
                f"{self.base_url} answered {what} with a body that is not JSON ({_snippet(raw)})"
            ) from None
        if status >= 400 or "problem+json" in ctype:
            raise _error_for(status, payload if isinstance(payload, dict) else {})
        return payload

    def _connection(self, deadline: float) -> http.client.HTTPConnection:
        if self._conn is None:
            timeout = max(deadline - time.monotonic(), 0.001)
            if self._scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=min(timeout, TLS_HANDSHAKE_SECONDS)
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        return self._conn

    def _send(
        self, method: str, url: str, data: bytes | None, headers: dict[str, str], what: str
    ) -> tuple[int, bytes, str]:
        deadline = time.monotonic() + self.timeout
        # One retry covers a keep-alive connection the server closed while we were idle.
        for attempt in (1, 2):
            conn = self._connection(deadline)
            reused = conn.sock is not None
            try:
                if conn.sock is None:
                    conn.connect()
                conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                conn.response_class = deadline_http.response_class(deadline)
                conn.request(method, url, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read(MAX_RESPONSE_BYTES + 1)
                if len(raw) > MAX_RESPONSE_BYTES:
                    self.close()  # the rest of that body is never read
                    raise ProtocolError(
                        f"{self.base_url} answered {what} with more than "
                        f"{MAX_RESPONSE_BYTES // 2**20} MiB"
                    )
                if resp.will_close:
                    self.close()
                return resp.status, raw, resp.getheader("Content-Type", "") or ""
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if attempt == 1 and reused:
                    continue
                where = f"{self._host}:{self._port or 80}"
                if self._scheme == "http" and deadline_http.speaks_tls(
                    self._host, self._port or 80
                ):
                    raise ProtocolError(
                        f"{self.base_url}: {where} speaks TLS, not plain HTTP (it dropped a "
                        f"plain request); use https://{where}"
                    ) from e
                raise UnreachableError(
                    f"control plane at {self.base_url} closed the connection: {e}"
                ) from e
            except ssl.SSLError as e:
                self.close()
                raise self._tls_failure(e) from e
            except TimeoutError as e:
                in_handshake = self._scheme == "https" and not deadline_http.handshake_done(conn)
                self.close()
                if in_handshake:
                    raise self._tls_failure(e) from e
                raise UnreachableError(
                    f"control plane at {self.base_url} did not answer {what} within "
                    f"{self.timeout:g}s"
                ) from e
            except http.client.HTTPException as e:
                self.close()
                raise ProtocolError(
                    f"{self.base_url} answered {what} with something that is not HTTP "
                    f"({type(e).__name__}: {_snippet(str(e).encode())})"
                    + ("; is it a TLS server? try https://" if self._scheme == "http" else "")
                ) from e
            except OSError as e:
                self.close()
                raise UnreachableError(
                    f"control plane at {self.base_url} is unreachable: {e.strerror or e}"
                ) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _tls_failure(self, e: Exception) -> NixfleetError:
        """A failed TLS handshake: say whether plain HTTP answers there instead."""
        where = f"{self._host}:{self._port or 443}"
        plain = deadline_http.plain_http_answer(self._host, self._port or 443)
        if plain is None:
            return UnreachableError(f"control plane at {self.base_url} is unreachable: {e}")
        if plain:
            return ProtocolError(
                f"{self.base_url}: {where} speaks plain HTTP, not TLS (it answered "
                f"{plain!r}); use http://{where}, or put TLS in front of it"
            )
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        return ProtocolError(f"{self.base_url}: TLS handshake with {where} failed ({reason})")

    # --- generic verbs: only tests call these (nixfleet itself uses the operations) --

    def get(self, path: str, **params: str | Sequence[str] | None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def _call(
        self,
        shape: type[T],
        method: str,
        path: str,
        body: Any = None,
        params: Params | None = None,
    ) -> T:
        """One operation: the answer checked against its documented wire shape."""
        payload = self.request(method, path, body, params)
        required: frozenset[str] = getattr(shape, "__required_keys__", frozenset())
        if not isinstance(payload, dict):
            raise ProtocolError(
                f"{self.base_url} answered {method} {path} with "
                f"{type(payload).__name__ if payload is not None else 'an empty body'}, "
                "not the documented JSON object; is it a nixfleet control plane?"
            )
        missing = sorted(required - payload.keys())
        if missing:
            raise ProtocolError(
                f"{self.base_url} answered {method} {path} without {', '.join(missing)}; "
                "is it a nixfleet control plane of a compatible version?"
            )
        return cast(T, payload)

    # --- service ----------------------------------------------------------------------

    def health(self) -> wire.ServiceHealth:
        return self._call(wire.ServiceHealth, "GET", "/health")

    # --- fleet and machines -------------------------------------------------------------

    def status(self, f: MachineFilter | None = None) -> wire.Status:
        params = filter_query(f or MachineFilter())
        return self._call(wire.Status, "GET", "/api/v1/status", params=params)

    def machines(
        self, tags: Sequence[str] = (), f: MachineFilter | None = None
    ) -> wire.MachineList:
        params = filter_query(f or MachineFilter(tags=tuple(tags)))
        return self._call(wire.MachineList, "GET", "/api/v1/machines", params=params)

    def machine(self, machine_id: str) -> wire.MachineDetail:
        return self._call(wire.MachineDetail, "GET", _machine(machine_id))

    def machine_history(
        self,
        machine_id: str,
        since: str | None = None,
        kinds: Sequence[str] = (),
        after: int = 0,
        limit: int = 1000,
    ) -> wire.MachineHistory:
        params = {
            "since": since,
            "kind": list(kinds) or None,
            "after": str(after),
            "limit": str(limit),
        }
        return self._call(
            wire.MachineHistory, "GET", _machine(machine_id, "/history"), params=params
        )

    def register_machine(
        self,
        machine_id: str,
        tags: Sequence[str] = (),
        lifecycle: str = "pending",
        issue_token: bool = False,
    ) -> wire.RegisteredMachine:
        body = {
            "id": machine_id,
            "tags": list(tags),
            "lifecycle": lifecycle,
            "issue_token": issue_token,
        }
        return self._call(wire.RegisteredMachine, "POST", "/api/v1/machines", body)

    def set_lifecycle(self, machine_id: str, lifecycle: str) -> wire.Machine:
        body = {"lifecycle": lifecycle}
        return self._call(wire.Machine, "PATCH", _machine(machine_id, "/lifecycle"), body)

    def add_tags(self, machine_id: str, tags: Sequence[str]) -> wire.Machine:
        body = {"tags": list(tags)}
        return self._call(wire.Machine, "POST", _machine(machine_id, "/tags"), body)

    def remove_tags(self, machine_id: str, tags: Sequence[str]) -> wire.Machine:
        body = {"tags": list(tags)}
        return self._call(wire.Machine, "DELETE", _machine(machine_id, "/tags"), body)

    def set_desired(
        self, machine_id: str, store_path: str, cache_url: str | None = None
    ) -> wire.Machine:
        body = {"store_path": store_path, "cache_url": cache_url}
        path = _machine(machine_id, "/desired-generation")
        return self._call(wire.Machine, "PUT", path, body)

    def clear_desired(self, machine_id: str) -> wire.Machine:
        path = _machine(machine_id, "/desired-generation")
        return self._call(wire.Machine, "DELETE", path)

    def desired_generation(self, machine_id: str) -> wire.DesiredGeneration:
        path = _machine(machine_id, "/desired-generation")
        return self._call(wire.DesiredGeneration, "GET", path)

    def retry(self, machine_id: str) -> wire.Machine:
        return self._call(wire.Machine, "POST", _machine(machine_id, "/retry"), {})

    def report(self, machine_id: str, body: Mapping[str, Any]) -> wire.ReportAnswer:
        """The agent's one round trip per poll."""
        path = _machine(machine_id, "/report")
        return self._call(wire.ReportAnswer, "POST", path, dict(body))

    def take_reboot_lease(self, machine_id: str) -> wire.RebootLeases:
        """A reboot slot (DESIGN §11); ConflictError (409) says why not now."""
        path = _machine(machine_id, "/reboot-lease")
        return self._call(wire.RebootLeases, "POST", path, {})

    def release_reboot_lease(self, machine_id: str) -> wire.ReleasedLeases:
        return self._call(wire.ReleasedLeases, "DELETE", _machine(machine_id, "/reboot-lease"))

    # --- credentials ------------------------------------------------------------------

    def rotate_token(self, machine_id: str) -> wire.MachineToken:
        return self._call(wire.MachineToken, "POST", _machine(machine_id, "/token"), {})

    def revoke_token(self, machine_id: str) -> wire.RevokedToken:
        return self._call(wire.RevokedToken, "DELETE", _machine(machine_id, "/token"))

    def keys(self, include_revoked: bool = False) -> wire.KeyList:
        params = {"all": "true" if include_revoked else None}
        return self._call(wire.KeyList, "GET", "/api/v1/keys", params=params)

    def create_key(self, name: str, role: str) -> wire.CreatedKey:
        body = {"name": name, "role": role}
        return self._call(wire.CreatedKey, "POST", "/api/v1/keys", body)

    def key(self, name: str) -> wire.Key:
        return self._call(wire.Key, "GET", f"/api/v1/keys/{_q(name)}")

    def revoke_key(self, name: str) -> wire.Key:
        return self._call(wire.Key, "DELETE", f"/api/v1/keys/{_q(name)}")

    def enroll_tokens(self) -> wire.EnrollTokenList:
        return self._call(wire.EnrollTokenList, "GET", "/api/v1/enroll-tokens")

    def create_enroll_token(
        self,
        uses: int,
        expires_in_seconds: int,
        tags: Sequence[str] = (),
        hostname_glob: str | None = None,
    ) -> wire.CreatedEnrollToken:
        body: wire.EnrollTokenCreate = {"uses": uses, "expires_in_seconds": expires_in_seconds}
        if tags:
            body["tags"] = list(tags)
        if hostname_glob:
            body["hostname_glob"] = hostname_glob
        return self._call(wire.CreatedEnrollToken, "POST", "/api/v1/enroll-tokens", body)

    def enroll_token(self, token_id: str) -> wire.EnrollToken:
        return self._call(wire.EnrollToken, "GET", f"/api/v1/enroll-tokens/{_q(token_id)}")

    def revoke_enroll_token(self, token_id: str) -> wire.EnrollToken:
        return self._call(wire.EnrollToken, "DELETE", f"/api/v1/enroll-tokens/{_q(token_id)}")

    def enroll(self, machine_id: str, tags: Sequence[str] = ()) -> wire.Enrolled:
        """The agent's side: this client's token is the enrollment token."""
        body = {"id": machine_id, "tags": list(tags)}
        return self._call(wire.Enrolled, "POST", "/api/v1/enroll", body)

    def audit(
        self,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        limit: int = 100,
    ) -> wire.AuditLog:
        params = {"actor": actor, "action": action, "target": target, "limit": str(limit)}
        return self._call(wire.AuditLog, "GET", "/api/v1/audit", params=params)

    # --- releases -----------------------------------------------------------------------

    def releases(self, limit: int | None = None) -> wire.ReleaseList:
        params = {"limit": None if limit is None else str(limit)}
        return self._call(wire.ReleaseList, "GET", "/api/v1/releases", params=params)

    def release(self, release_id: str) -> wire.Release:
        return self._call(wire.Release, "GET", f"/api/v1/releases/{_q(release_id)}")

    def register_release(self, document: Mapping[str, Any]) -> wire.RegisteredRelease:
        """POST a release document (flake.release_document); the same entries are idempotent."""
        return self._call(wire.RegisteredRelease, "POST", "/api/v1/releases", dict(document))

    def release_diff(self, a: str, b: str) -> wire.ReleaseDiff:
        path = f"/api/v1/releases/{_q(a)}/diff/{_q(b)}"
        return self._call(wire.ReleaseDiff, "GET", path)

    def delete_release(self, release_id: str) -> None:
        self.request("DELETE", f"/api/v1/releases/{_q(release_id)}")

    # --- rollouts -----------------------------------------------------------------------

    def rollouts(self, status: str | None = None) -> wire.RolloutList:
        return self._call(wire.RolloutList, "GET", "/api/v1/rollouts", params={"status": status})

    def rollout(self, ref: str) -> wire.Rollout:
        """One rollout by id or name."""
        return self._call(wire.Rollout, "GET", _rollout(ref))

    def apply_rollout(self, document: Mapping[str, Any]) -> wire.AppliedRollout:
        return self._call(wire.AppliedRollout, "POST", "/api/v1/rollouts", dict(document))

    def plan_rollout(self, document: Mapping[str, Any]) -> wire.Plan:
        return self._call(wire.Plan, "POST", "/api/v1/rollouts/plan", dict(document))

    def control_rollout(self, ref: str, action: str) -> wire.Rollout:
        """pause, resume or cancel."""
        if action not in ("pause", "resume", "cancel"):
            raise UsageError(f"unknown rollout action {action!r}: pause, resume or cancel")
        return self._call(wire.Rollout, "POST", _rollout(ref, f"/{action}"), {})

    # --- webhooks -----------------------------------------------------------------------

    def webhook_deliveries(self, failed: bool = False, limit: int = 100) -> wire.WebhookDeliveries:
        params = {"failed": "true" if failed else None, "limit": str(limit)}
        return self._call(
            wire.WebhookDeliveries, "GET", "/api/v1/webhooks/deliveries", params=params
        )


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _machine(machine_id: str, suffix: str = "") -> str:
    return f"/api/v1/machines/{_q(machine_id)}{suffix}"


def _rollout(ref: str, suffix: str = "") -> str:
    return f"/api/v1/rollouts/{_q(ref)}{suffix}"


def encode(body: Any) -> bytes:
    """A request body: compact JSON, the form the control plane reads fastest
    (api.body._compact: every agent report)."""
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # A lone surrogate (an argument that was not UTF-8): sent escaped, as before,
        # so that the control plane refuses it naming the field.
        return json.dumps(body, separators=(",", ":")).encode()


def _parse(raw: bytes) -> Any:
    """JSON text to Python: orjson (the status of 100,000 machines, 44 MB, in ~0.3 s where
    json.loads takes ~0.45 s); json.loads where orjson refuses what json accepts (an
    integer past 64 bits).

    With the cyclic collector paused (gcpause): parsed JSON is a tree, but the 1.3
    million dicts and lists of a 100,000-machine status set off collections that walk
    them again and again (docs/performance.md, "The CLI's parse").
    """
    with gcpause.paused():
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json.loads(raw)


def _snippet(raw: bytes, size: int = 60) -> str:
    text = " ".join(raw[:size].decode(errors="replace").split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return repr(text + ("…" if len(raw) > size else ""))


def _error_for(status: int, payload: Mapping[str, Any]) -> NixfleetError:
    slug = str(payload.get("type", "")).rsplit("/", 1)[-1]
    cls = BY_SLUG.get(slug)
    if cls is None:
        cls = next((c for c in BY_SLUG.values() if c.http_status == status), NixfleetError)
        if status in (502, 503, 504):
            cls = UnreachableError
    detail = str(payload.get("detail") or payload.get("title") or f"HTTP {status}")
    raw_errors = payload.get("errors")
    errors = [
        FieldError(str(e.get("field", "")), str(e.get("message", "")), e.get("line"))
        for e in (raw_errors if isinstance(raw_errors, list) else [])
        if isinstance(e, Mapping)
    ]
    return cls(detail, errors=errors)


def filter_query(f: MachineFilter) -> dict[str, str | None]:
    """The query string of GET /api/v1/status and /machines for a filter (None: absent)."""
    tags = [*f.tags, *(f"!{t}" for t in f.not_tags)]
    return {
        "tag": ",".join(tags) or None,
        "lifecycle": f.lifecycle.value if f.lifecycle else None,
        "sync": f.sync.value if f.sync else None,
        "health": f.health.value if f.health else None,
        "stale": None if f.stale is None else ("true" if f.stale else "false"),
        "host": f.search or None,
        "sort": f.sort if f.sort != "host" else None,
        "dir": "desc" if f.descending else None,
    }
