"""One error hierarchy for the library, the API and the CLI.

Each class carries the HTTP status the API answers with and the exit code the CLI
ends with, so the mapping lives here and is applied in exactly one place each
(the API error handler and the CLI's main).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nixfleet.wire import FieldErrorBody


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of an input document."""

    field: str
    message: str
    line: int | None = None

    def to_dict(self) -> FieldErrorBody:
        out: FieldErrorBody = {"field": self.field, "message": self.message}
        if self.line is not None:
            out["line"] = self.line
        return out

    def __str__(self) -> str:
        where = f"{self.field} (line {self.line})" if self.line is not None else self.field
        return f"{where}: {self.message}"


class NixfleetError(Exception):
    """Root of every error nixfleet raises on purpose."""

    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    title: ClassVar[str] = "Internal error"
    slug: ClassVar[str] = "internal"

    def __init__(self, detail: str, *, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []

    def __str__(self) -> str:
        if not self.errors:
            return self.detail
        return self.detail + "\n" + "\n".join(f"  - {e}" for e in self.errors)


class UsageError(NixfleetError):
    http_status = 400
    exit_code = 2
    title = "Bad request"
    slug = "bad-request"


class ValidationError(NixfleetError):
    """An input document (API body, rollout file, release file) is invalid."""

    http_status = 422
    exit_code = 7
    title = "Invalid input"
    slug = "validation"


class NotFoundError(NixfleetError):
    http_status = 404
    exit_code = 3
    title = "Not found"
    slug = "not-found"


class ConflictError(NixfleetError):
    """Invalid lifecycle transition, overlapping rollout, duplicate resource."""

    http_status = 409
    exit_code = 4
    title = "Conflict"
    slug = "conflict"


class GoneError(NixfleetError):
    """The machine is decommissioned: its reports are refused."""

    http_status = 410
    exit_code = 4
    title = "Gone"
    slug = "gone"


class PayloadTooLargeError(NixfleetError):
    http_status = 413
    exit_code = 7
    title = "Payload too large"
    slug = "payload-too-large"


class UnsupportedMediaTypeError(NixfleetError):
    http_status = 415
    exit_code = 2
    title = "Unsupported media type"
    slug = "unsupported-media-type"


class AuthenticationError(NixfleetError):
    http_status = 401
    exit_code = 6
    title = "Unauthorized"
    slug = "unauthorized"


class PermissionDeniedError(NixfleetError):
    http_status = 403
    exit_code = 6
    title = "Forbidden"
    slug = "forbidden"


class UnreachableError(NixfleetError):
    """The control plane did not answer (connection refused, timeout, 5xx proxy)."""

    http_status = 503
    exit_code = 5
    title = "Control plane unreachable"
    slug = "unreachable"


class StoreUnavailableError(NixfleetError):
    """The database takes no writes now: disk full, read-only, its write lock held
    elsewhere past the wait limit, or its file replaced or deleted under the process.
    Answered 503 with Retry-After; reads go on."""

    http_status = 503
    exit_code = 5
    title = "Service unavailable"
    slug = "store-unavailable"
    retry_after: ClassVar[int] = 5


class NotLeaderError(StoreUnavailableError):
    """A background transaction of a replica that is no longer the leader (its
    fencing epoch is not the database's, docs/scaling.md): it wrote nothing. The
    background jobs stop on it; were it to reach a client, it is a 503 like any
    store that takes no writes now."""


class DatabaseFileError(NixfleetError):
    """At start-up: the database file is corrupt, empty where one is expected, not a
    database, or newer than this code. Exit 7 (an invalid input file), no traceback."""

    http_status = 500
    exit_code = 7
    title = "Database unusable"
    slug = "database-unusable"


class ProtocolError(NixfleetError):
    """Something answered, but not as the nixfleet API: a web server, TLS/plain mismatch,
    a body that is not the documented JSON object. Not "down": no CP-down guidance."""

    http_status = 502
    exit_code = 1
    title = "Not a nixfleet control plane"
    slug = "protocol"


class ServiceError(NixfleetError):
    """A long-running program (control plane, agent) cannot start or had to stop."""

    http_status = 500
    exit_code = 1
    title = "Service error"
    slug = "service"


class CommandError(NixfleetError):
    """A subprocess (usually nix) failed; detail carries its stderr tail."""

    http_status = 502
    exit_code = 1
    title = "Command failed"
    slug = "command-failed"


class RolloutHaltedError(NixfleetError):
    """`rollout status --wait` saw the rollout pause or fail."""

    http_status = 409
    exit_code = 8
    title = "Rollout halted"
    slug = "rollout-halted"


BY_SLUG: dict[str, type[NixfleetError]] = {
    cls.slug: cls
    for cls in (
        NixfleetError,
        UsageError,
        ValidationError,
        NotFoundError,
        ConflictError,
        GoneError,
        PayloadTooLargeError,
        UnsupportedMediaTypeError,
        AuthenticationError,
        PermissionDeniedError,
        UnreachableError,
        StoreUnavailableError,
        DatabaseFileError,
        ProtocolError,
        ServiceError,
        CommandError,
        RolloutHaltedError,
    )
}
