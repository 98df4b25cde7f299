"""The JSON Schemas in schemas/ are the single source of truth for every input document.

Validators are compiled once per process (they are on the report hot path), and
errors become FieldErrors that name the field in dotted form and say how to fix it.

jsonschema costs ~0.5 ms per report body (it re-resolves $refs and builds a validator
per subschema on every call), more than everything else the report path does. So
each schema is also compiled, once, into a plain-Python predicate (`_compile`: Python
source, one function per object or array level, each keyword one `if`) that
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
from datetime import datetime
from importlib import resources
from typing import Any, cast

from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema import ValidationError as SchemaError
from referencing import Registry, Resource

from nixfleet import models
from nixfleet.errors import FieldError, ValidationError
from nixfleet.wire import JSONObject

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
def load(name: str) -> JSONObject:
    """The schema document `schemas/<name>.schema.json`."""
    data: JSONObject = json.loads((_schema_dir() / f"{name}.schema.json").read_text())
    return data


@functools.cache
def ecma_pattern(pattern: str) -> re.Pattern[str]:
    """A schema pattern compiled with ECMA-262's `$`: the end of the string, nothing after.

    JSON Schema patterns are ECMA-262 regexes, where `$` (no multiline flag) matches
    only at the very end; Python's `$` also matches before a final newline, so
    `^[a-z]+$` used to accept "web\\n". Each unescaped `$` outside a character class
    becomes `\\Z`.
    """
    out: list[str] = []
    escaped = in_class = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "$":
            out.append("\\Z")
            continue
        out.append(ch)
    return re.compile("".join(out))


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if type(instance) is str and not ecma_pattern(pattern).search(instance):
        yield SchemaError(f"{instance!r} does not match {pattern!r}")


def _is_date_time(value: object) -> bool:
    """RFC 3339 with a real calendar date ("2026-02-30T00:00:00Z" is refused)."""
    if type(value) is not str:
        return True
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            return False
        # As stored (UTC, four-digit year): year 672 or 9999-12-31T23:00-02:00 would
        # be stored in a form no later read parses (models.isoformat/parse_time).
        stored = models.isoformat(parsed)
        return stored is not None and models.parse_time(stored) == parsed and parsed.year >= 1970
    except (ValueError, OverflowError):
        return False


FORMATS = FormatChecker(formats=())
FORMATS.checks("date-time")(_is_date_time)

# An integer is an int: 90.0 for a duration or a count is a 4xx naming the field, where
# JSON Schema's own rule (a float with no fraction is an integer) let it reach code
# that needs an int.
_Validator = validators.extend(
    Draft202012Validator,
    validators={"pattern": _pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, x: type(x) is int
    ),
)


@functools.cache
def validator(name: str) -> Draft202012Validator:
    schema = load(name)
    Draft202012Validator.check_schema(schema)
    v: Draft202012Validator = _Validator(schema, registry=_registry(), format_checker=FORMATS)
    return v


Check = Callable[[Any], bool]

# Keywords without effect on validity here.
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
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)


class _Unsupported(Exception):
    """A keyword the fast path does not implement: use jsonschema for this schema."""


# Keywords whose check is one condition on the value itself (emitted inline); the
# others (items, properties, anyOf, $ref to such) get a function of their own.
_FLAT = frozenset(
    {
        "type",
        "enum",
        "const",
        "format",
        "pattern",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "uniqueItems",
        "required",
        "additionalProperties",
    }
)
_TYPE_TEST = {
    "object": "type({v}) is dict",
    "array": "type({v}) is list",
    "string": "type({v}) is str",
    "boolean": "type({v}) is bool",
    "null": "{v} is None",
    # A float with no fraction is a JSON Schema integer too: left to jsonschema.
    "integer": "type({v}) is int",
    "number": "(type({v}) is int or type({v}) is float)",
}
_KIND = {"L": "str", "I": "list", "P": "dict"}
_OPS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


class _Compiler:
    """Writes each schema as Python source: one function per object/array level,
    every keyword an `if` that returns False (~10x fewer calls than closures)."""

    def __init__(self) -> None:
        self.functions: list[str] = []
        self.consts: dict[str, object] = {"_MISSING": _MISSING, "_is_date_time": _is_date_time}
        self.done: dict[int, str] = {}  # id(schema) -> its function (recursion, reuse)
        self.count = 0

    def const(self, value: Any) -> str:
        name = f"_k{len(self.consts)}"
        self.consts[name] = value
        return name

    def function(self, schema: Any, resolver: Any) -> str:
        key = id(schema)
        if key in self.done:
            return self.done[key]
        name = self.done[key] = f"_f{len(self.done)}"
        lines = [f"def {name}(x):"]
        self.body(schema, resolver, "x", lines, "    ")
        lines.append("    return True")
        self.functions.append("\n".join(lines))
        return name

    def body(self, schema: Any, resolver: Any, v: str, out: list[str], ind: str) -> None:
        """Statements that return False unless `v` is valid against `schema`."""
        if schema is True:
            return
        if schema is False or not isinstance(schema, dict):
            raise _Unsupported(repr(schema)[:40])
        for key, value in schema.items():
            if key in _ANNOTATIONS:
                continue
            if key == "$ref":
                resolved = resolver.lookup(value)
                sub = resolved.contents
                if isinstance(sub, dict) and set(sub) - _ANNOTATIONS <= _FLAT:
                    self.body(sub, resolved.resolver, v, out, ind)
                else:
                    out.append(f"{ind}if not {self.function(sub, resolved.resolver)}({v}):")
                    out.append(f"{ind}    return False")
                continue
            cond = self.failing(key, value, schema, resolver, v)
            out.append(f"{ind}if {cond}:")
            out.append(f"{ind}    return False")

    def failing(self, key: str, value: Any, schema: JSONObject, resolver: Any, v: str) -> str:
        """A condition that holds when `v` fails the keyword (or it is not certain)."""
        if key == "type":
            names: list[str] = [value] if isinstance(value, str) else list(value)
            return "not (" + " or ".join(_TYPE_TEST[n].format(v=v) for n in names) + ")"
        if key in ("enum", "const"):
            options = value if key == "enum" else [value]
            strings = self.const(frozenset(o for o in options if type(o) is str))
            return f"not (type({v}) is str and {v} in {strings})"
        if key == "format":
            return "False" if value != "date-time" else f"not _is_date_time({v})"
        if key == "pattern":
            search = self.const(ecma_pattern(value).search)
            return f"(type({v}) is str and {search}({v}) is None)"
        if key in ("minLength", "maxLength", "minItems", "maxItems"):
            op = ">=" if key.startswith("min") else "<="
            return f"(type({v}) is {_KIND[key[3]]} and not len({v}) {op} {int(value)})"
        if key in ("minProperties", "maxProperties"):
            op = ">=" if key.startswith("min") else "<="
            return f"(type({v}) is dict and not len({v}) {op} {int(value)})"
        if key in _OPS:
            bound = self.const(value)
            return f"((type({v}) is int or type({v}) is float) and not {v} {_OPS[key]} {bound})"
        if key == "uniqueItems":
            if not value:
                return "False"
            # Only strings are certain: jsonschema's equality treats 1, 1.0 and True specially.
            return (
                f"(type({v}) is list and not (all(type(i) is str for i in {v}) "
                f"and len(set({v})) == len({v})))"
            )
        if key == "required":
            if not value:
                return "False"
            present = " and ".join(f"{self.const(str(n))} in {v}" for n in value)
            return f"(type({v}) is dict and not ({present}))"
        if key == "additionalProperties":
            if "patternProperties" in schema:
                raise _Unsupported("patternProperties")
            if value is True:
                return "False"
            if value is not False:
                raise _Unsupported("additionalProperties schema")
            allowed = self.const(frozenset(schema.get("properties", {})))
            return f"(type({v}) is dict and not {allowed}.issuperset({v}))"
        if key == "items":
            item = self.function(value, resolver)
            return f"(type({v}) is list and not all(map({item}, {v})))"
        if key == "properties":
            return f"(type({v}) is dict and not {self.properties(value, resolver)}({v}))"
        if key == "anyOf":
            options = [self.function(sub, resolver) for sub in value]
            return "not (" + " or ".join(f"{o}({v})" for o in options) + ")"
        raise _Unsupported(key)

    def properties(self, props: JSONObject, resolver: Any) -> str:
        self.count += 1
        name = f"_p{self.count}"
        lines = [f"def {name}(x):"]
        for i, (prop, sub) in enumerate(props.items()):
            var = f"v{i}"
            lines.append(f"    {var} = x.get({prop!r}, _MISSING)")
            lines.append(f"    if {var} is not _MISSING:")
            inner: list[str] = []
            self.body(sub, resolver, var, inner, "        ")
            lines.extend(inner or ["        pass"])
        lines.append("    return True")
        self.functions.append("\n".join(lines))
        return name


_MISSING = object()


def _compile(schema: Any, resolver: Any) -> Check:
    """A predicate that is True only for documents jsonschema accepts."""
    compiler = _Compiler()
    top = compiler.function(schema, resolver)
    namespace: dict[str, object] = dict(compiler.consts)
    exec("\n\n".join(compiler.functions), namespace)  # noqa: S102 (our own generated code)
    check = cast(Check, namespace[top])
    return check


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


# What no text field may hold: C0 controls but tab and newline, DEL, C1 controls and
# lone surrogates (which cannot be encoded as UTF-8, so SQLite and every response
# would fail on them later). Identifiers allow far less, through their patterns.
_BAD_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# In strict JSON text (no raw C0 controls; valid UTF-8 holds no surrogates), a string
# can hold one of those only through an escape or a raw DEL/C1 character.
_MAYBE_BAD = re.compile("[\\\\\x7f-\x9f]")


def text_errors(document: Any, path: tuple[str | int, ...] = ()) -> list[FieldError]:
    """Every string (keys included) with a character no text field may hold."""
    out: list[FieldError] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [(path, document)]
    search = _BAD_TEXT.search
    while stack:
        where, value = stack.pop()
        kind = type(value)
        if kind is str:
            bad = search(value)
            if bad is not None:
                out.append(FieldError(field_path(where), _bad_char(bad.group())))
        elif kind is dict:
            for k, v in value.items():
                if type(k) is str and search(k) is not None:
                    out.append(FieldError(field_path(where), f"key {k!r}: {_bad_char(k)}"))
                stack.append(((*where, k), v))
        elif kind is list:
            stack.extend(((*where, i), v) for i, v in enumerate(value))
    out.reverse()
    return out


def printable(text: str) -> str:
    """The text with every character text_errors refuses written as an escape (`\\x1b`).

    For text the agent passes on from elsewhere (a health check's output), so that
    its report is accepted and still says what happened.
    """
    return _BAD_TEXT.sub(
        lambda m: (
            f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}"
        ),
        text,
    )


def _bad_char(text: str) -> str:
    bad = _BAD_TEXT.search(text)
    code = ord(bad.group()) if bad else 0
    kind = "a lone surrogate" if 0xD800 <= code <= 0xDFFF else "a control character"
    return f"contains {kind} (U+{code:04X}); send printable text"


def errors_of(name: str, document: Any) -> list[FieldError]:
    errs = sorted(validator(name).iter_errors(document), key=lambda e: list(map(str, e.path)))
    return text_errors(document) + [FieldError(*_describe(e)) for e in errs]


def validate(name: str, document: Any, what: str | None = None, *, source: str = "") -> None:
    """Raise ValidationError listing every problem of the document.

    `source`: the JSON text the document was parsed from (strictly: no raw control
    characters), when the caller has it; text without an escape or a DEL/C1
    character cannot hold a bad character, so the per-string walk is skipped.
    """
    fast = fast_check(name)
    if (
        fast is not None
        and fast(document)
        and ((source and _MAYBE_BAD.search(source) is None) or not _has_bad_text(document))
    ):
        return
    errors = errors_of(name, document)
    if errors:
        noun = what or name.replace("-", " ")
        raise ValidationError(f"invalid {noun}: {len(errors)} error(s)", errors=errors)


def _has_bad_text(document: Any) -> bool:
    """The hot path's form of text_errors: stops at the first string that fails."""
    stack = [document]
    search = _BAD_TEXT.search
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is str:
            if search(value) is not None:
                return True
        elif kind is dict:
            for k, v in value.items():
                if type(k) is str and search(k) is not None:
                    return True
                stack.append(v)
        elif kind is list:
            stack.extend(value)
    return False
