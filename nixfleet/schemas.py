"""The JSON Schemas in schemas/ are the single source of truth for every input document.

Validators are compiled once per process (they are on the report hot path), and
errors become FieldErrors that name the field in dotted form and say how to fix it.

jsonschema costs ~0.5 ms per report body (it re-resolves $refs and builds a validator
per subschema on every call), more than everything else the report path does. So
each schema is also compiled, once, into a plain-Python predicate (`_compile`) that
answers "certainly valid". It is conservative: any keyword it does not know makes
the whole schema fall back to jsonschema, and any value it is unsure about (a float
for an integer, a non-string enum) answers "not certain" and lets jsonschema decide
and phrase the errors. Valid documents, the hot path, never reach jsonschema.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
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


Check = Callable[[Any], bool]

# Keywords without effect on validity here (format is an annotation: format_checker=None).
_ANNOTATIONS = frozenset(
    {
        "$schema",
        "$id",
        "$defs",
        "$comment",
        "title",
        "description",
        "default",
        "examples",
        "format",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
_TYPES: dict[str, Check] = {
    "object": lambda x: type(x) is dict,
    "array": lambda x: type(x) is list,
    "string": lambda x: type(x) is str,
    "boolean": lambda x: type(x) is bool,
    "null": lambda x: x is None,
    # A float with no fraction is a JSON Schema integer too: left to jsonschema.
    "integer": lambda x: type(x) is int,
    "number": lambda x: type(x) is int or type(x) is float,
}


class _Unsupported(Exception):
    """A keyword the fast path does not implement: use jsonschema for this schema."""


def _is_num(x: Any) -> bool:
    return type(x) is int or type(x) is float


def _compile(schema: Any, resolver: Any) -> Check:
    """A predicate that is True only for documents jsonschema accepts."""
    if schema is True:
        return lambda x: True
    if schema is False or not isinstance(schema, dict):
        raise _Unsupported(repr(schema)[:40])
    checks: list[Check] = []
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        checks.append(_keyword(key, value, schema, resolver))
    if not checks:
        return lambda x: True
    if len(checks) == 1:
        return checks[0]
    # Explicit loops, not all(<genexpr>): this runs ~50 times per report body.
    first, rest = checks[0], tuple(checks[1:])

    def every(x: Any) -> bool:
        if not first(x):
            return False
        for c in rest:  # noqa: SIM110 (a loop: no generator per call)
            if not c(x):
                return False
        return True

    return every


def _keyword(key: str, value: Any, schema: dict[str, Any], resolver: Any) -> Check:
    if key == "$ref":
        resolved = resolver.lookup(value)
        return _compile(resolved.contents, resolved.resolver)
    if key == "type":
        names: list[str] = [value] if isinstance(value, str) else list(value)
        tests = [_TYPES[n] for n in names]
        if len(tests) == 1:
            return tests[0]
        return lambda x: any(t(x) for t in tests)
    if key in ("enum", "const"):
        options = value if key == "enum" else [value]
        strings = frozenset(v for v in options if type(v) is str)
        return lambda x: type(x) is str and x in strings
    if key == "pattern":
        search = re.compile(value).search
        return lambda x: type(x) is not str or search(x) is not None
    if key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        kind = {"L": str, "I": list, "P": dict}[key[3]]
        n = int(value)
        if key.startswith("min"):
            return lambda x: type(x) is not kind or len(x) >= n
        return lambda x: type(x) is not kind or len(x) <= n
    if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bound = value
        op: Check = {
            "minimum": lambda x: x >= bound,
            "maximum": lambda x: x <= bound,
            "exclusiveMinimum": lambda x: x > bound,
            "exclusiveMaximum": lambda x: x < bound,
        }[key]
        return lambda x: not _is_num(x) or op(x)
    if key == "uniqueItems":
        if not value:
            return lambda x: True
        # Only strings are certain: jsonschema's equality treats 1, 1.0 and True specially.
        return lambda x: (
            type(x) is not list or (all(type(i) is str for i in x) and len(set(x)) == len(x))
        )
    if key == "items":
        item = _compile(value, resolver)

        def items(x: Any) -> bool:
            if type(x) is list:
                for i in x:
                    if not item(i):
                        return False
            return True

        return items
    if key == "required":
        required = tuple(value)
        return lambda x: type(x) is not dict or all(n in x for n in required)
    if key == "properties":
        props = {name: _compile(sub, resolver) for name, sub in value.items()}
        get = props.get

        def properties(x: Any) -> bool:
            if type(x) is dict:
                for k, v in x.items():
                    check = get(k)
                    if check is not None and not check(v):
                        return False
            return True

        return properties
    if key == "additionalProperties":
        if "patternProperties" in schema:
            raise _Unsupported("patternProperties")
        if value is True:
            return lambda x: True
        if value is not False:
            raise _Unsupported("additionalProperties schema")
        allowed = frozenset(schema.get("properties", {}))
        return lambda x: type(x) is not dict or allowed.issuperset(x)
    if key == "anyOf":
        options = [_compile(sub, resolver) for sub in value]
        return lambda x: any(o(x) for o in options)
    raise _Unsupported(key)


@functools.cache
def fast_check(name: str) -> Check | None:
    """The compiled predicate for a schema, or None where jsonschema must decide alone."""
    schema = load(name)
    resolver = _registry().resolver(base_uri=BASE_URI + f"{name}.schema.json")
    try:
        return _compile(schema, resolver)
    except (_Unsupported, KeyError, TypeError, ValueError, RecursionError, re.error):
        return None


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
    fast = fast_check(name)
    if fast is not None and fast(document):
        return
    errors = errors_of(name, document)
    if errors:
        noun = what or name.replace("-", " ")
        raise ValidationError(f"invalid {noun}: {len(errors)} error(s)", errors=errors)
