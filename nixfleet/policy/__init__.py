"""Rollout policy beyond batches (DESIGN §11): windows, budgets, reboot leases.

Pure decisions, no I/O: nixfleet.policy.windows, .budgets, .leases and .reboot.
This module turns the policy fields of a rollout document into a RolloutPolicy and
says what the JSON Schema cannot (a time zone exists, a window has a length).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nixfleet.errors import FieldError, ValidationError
from nixfleet.policy import windows as windows_mod
from nixfleet.policy.budgets import MaxUnavailable
from nixfleet.policy.reboot import RebootPolicy
from nixfleet.policy.windows import Window


@dataclass(frozen=True)
class RolloutPolicy:
    """The §11 fields of one rollout document (all optional)."""

    max_unavailable: MaxUnavailable | None = None
    windows: tuple[Window, ...] = ()
    reboot: RebootPolicy = RebootPolicy.NEVER

    @property
    def active(self) -> bool:
        return self.max_unavailable is not None or bool(self.windows)


def from_document(doc: Mapping[str, Any]) -> RolloutPolicy:
    """The policy of a document that `schemas.validate(rollout.SCHEMA, …)` accepted."""
    return RolloutPolicy(
        max_unavailable=MaxUnavailable.parse(doc.get("max_unavailable")),
        windows=windows_mod.parse(doc.get("windows")),
        reboot=RebootPolicy(doc.get("reboot", RebootPolicy.NEVER.value)),
    )


def document_errors(doc: Any) -> list[FieldError]:
    """Errors of the policy fields beyond the schema's: run after it, on any document."""
    if not isinstance(doc, Mapping):
        return []
    return windows_mod.errors(doc.get("windows"))


def validate(doc: Any, what: str = "rollout") -> None:
    """Raise ValidationError (every error, field-named) for what `document_errors` finds."""
    errors = document_errors(doc)
    if errors:
        raise ValidationError(f"invalid {what}: {len(errors)} error(s)", errors=errors)
