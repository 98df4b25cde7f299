"""`nixfleet deploy`: the rollout document that a handful of options describe.

Library, not CLI (DESIGN §2 rule 1): the document is built and validated exactly
like a rollout file, and the field errors name the options that set them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from nixfleet import rollout, schemas
from nixfleet.errors import FieldError, ValidationError
from nixfleet.wire import RolloutDocument

# The option that sets each top-level field, for error messages.
FLAGS = {"batches": "--batch-size", "target": "--tags/--hosts", "release": "--release"}


@dataclass(frozen=True)
class DeployOptions:
    release: str
    tags: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    strategy: str = "canary"
    batch_size: list[str] = field(default_factory=list)
    failure_threshold: str = "0"
    on_failure: str = "pause"
    health_timeout: str = "5m"
    soak: str = "0s"
    name: str | None = None


def _count_or_text(value: str) -> int | str:
    value = value.strip()
    return int(value) if value.isdigit() else value


def document(opts: DeployOptions) -> RolloutDocument:
    """The validated rollout document; without a name, one derived from the options
    (the same deploy run twice is the same rollout, i.e. a no-op)."""
    target: dict[str, list[str]] = {}
    if opts.tags:
        target["tags"] = list(opts.tags)
    if opts.hosts:
        target["hosts"] = list(opts.hosts)
    doc: RolloutDocument = {
        "version": 1,
        "name": opts.name or "",
        "release": opts.release,
        "target": target,
        "strategy": opts.strategy,
        "failure_threshold": _count_or_text(opts.failure_threshold),
        "on_failure": opts.on_failure,
        "health_timeout": _count_or_text(opts.health_timeout),
        "soak": _count_or_text(opts.soak),
    }
    if opts.batch_size:
        doc["batches"] = [_count_or_text(b) for b in opts.batch_size]
    if not opts.name:
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:8]
        doc["name"] = f"deploy-{opts.release.removeprefix('rel-')}-{digest}"
    errors = [
        FieldError(
            FLAGS.get(e.field.split("[")[0].split(".")[0], "--" + e.field.replace("_", "-")),
            e.message,
        )
        for e in schemas.errors_of(rollout.SCHEMA, doc)
    ]
    if errors:
        raise ValidationError("invalid deploy options", errors=errors)
    return doc
