"""The JSON Schemas in schemas/ are the single source of truth for every input document.

Validators are compiled once per process (they are on the report hot path), and
errors become FieldErrors that name the field in dotted form and say how to fix it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema import ValidationError as SchemaError
from referencing import Registry, Resource

from nixfleet.errors import FieldError, ValidationError

BASE_URI = "https://nixfleet.dev/schemas/"


def _schema_dir() -> Any:
    return resources.files("nixfleet") / "schemas"


@functools.cache
def _registry() -> Registry:
    registry: Registry = Registry()
    for entry in _schema_dir().iterdir():
        if entry.name.endswith(".schema.json"):
            contents = json.loads(entry.read_text())
            registry = registry.with_resource(
                BASE_URI + entry.name, Resource.from_contents(contents)
            )
    return registry


@functools.cache
def load(name: str) -> dict[str, Any]:
    """The schema document `schemas/<name>.schema.json`."""
    data: dict[str, Any] = json.loads((_schema_dir() / f"{name}.schema.json").read_text())
    return data


@functools.cache
def validator(name: str) -> Draft202012Validator:
    schema = load(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=_registry(), format_checker=None)


def field_path(path: Any) -> str:
    """['health', 'results', 0, 'name'] -> 'health.results[0].name'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(document)"


def _describe(error: SchemaError) -> tuple[str, str]:
    """(field, message) for one schema error, phrased as what to do."""
    path = list(error.absolute_path)
    validator_name = error.validator
    if validator_name == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = (
            sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        )
        name = extra[0] if extra else "?"
        return field_path([*path, name]), f"unknown field; allowed fields: {', '.join(allowed)}"
    if validator_name == "required":
        missing = str(error.message).split("'")[1] if "'" in error.message else "?"
        return field_path([*path, missing]), "is required"
    if validator_name == "pattern":
        hint = error.schema.get("description") or f"must match {error.validator_value}"
        return field_path(path), f"{error.instance!r}: {hint}"
    if validator_name == "enum":
        options = ", ".join(str(v) for v in error.validator_value)
        return field_path(path), f"{error.instance!r} is not one of: {options}"
    if validator_name == "type":
        return field_path(path), f"must be of type {error.validator_value}"
    if validator_name in ("anyOf", "oneOf") and error.context:
        best = min(error.context, key=lambda e: len(list(e.path)))
        return _describe(best)
    return field_path(path), error.message


def errors_of(name: str, document: Any) -> list[FieldError]:
    errs = sorted(validator(name).iter_errors(document), key=lambda e: list(map(str, e.path)))
    return [FieldError(*_describe(e)) for e in errs]


def validate(name: str, document: Any, what: str | None = None) -> None:
    """Raise ValidationError listing every problem of the document."""
    errors = errors_of(name, document)
    if errors:
        noun = what or name.replace("-", " ")
        raise ValidationError(f"invalid {noun}: {len(errors)} error(s)", errors=errors)


def checker(name: str, what: str | None = None) -> Callable[[Mapping[str, Any]], None]:
    """A pre-bound validate() for hot paths; compiles the validator now."""
    validator(name)
    return functools.partial(validate, name, what=what)
