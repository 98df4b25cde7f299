"""Reading rollout files (YAML or JSON) with every error's field path and line.

PyYAML's composed node tree keeps a mark per node, so after schema validation each
error's field path (`batches[2]`, `target.tags`) is mapped back to the line it sits
on (or, for a missing field, the line of its parent). Used by `nixfleet rollout
validate/plan/apply` and by the control plane's --rollouts-dir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nixfleet import flake, policy, rollout, schemas
from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import Release
from nixfleet.wire import RolloutDocument

# A rollout file of 100,000 hosts is ~2 MB and ~100,000 nodes; these bounds leave room
# for that and refuse an anchor/alias "billion laughs" (a few hundred bytes expanding to
# gigabytes) after composing, which shares aliased nodes, and before anything walks
# or constructs the expanded tree.
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_NODES = 500_000
MAX_SCALAR_CHARS = 32 * 1024 * 1024


def _expanded_size(root: yaml.Node) -> tuple[int, int]:
    """(nodes, scalar characters) of the tree with every alias expanded, without expanding.

    Each distinct node is visited once (aliases are the same node object), children
    before parents; a recursive alias (a node inside itself) counts as over any limit.
    """
    sizes: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            nodes, chars = 1, 0
            for child in _children(node):
                n, c = sizes[id(child)]
                nodes, chars = nodes + n, chars + c
            if isinstance(node, yaml.ScalarNode):
                chars += len(node.value)
            sizes[key] = (min(nodes, MAX_NODES + 1), min(chars, MAX_SCALAR_CHARS + 1))
            continue
        if key in sizes:
            continue
        if key in on_path:
            return MAX_NODES + 1, 0
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _walk(node: yaml.Node, path: str, lines: dict[str, int], errors: list[FieldError]) -> None:
    lines.setdefault(path or "(document)", node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            child = f"{path}.{name}" if path else name
            if name in seen:
                errors.append(
                    FieldError(
                        child, "appears twice; give each field once", key.start_mark.line + 1
                    )
                )
            seen.add(name)
            lines[child] = key.start_mark.line + 1
            _walk(value, child, lines, errors)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, f"{path}[{i}]", lines, errors)


def line_of(field: str, lines: dict[str, int]) -> int | None:
    """The line of a field, else of its nearest ancestor that exists."""
    current = field
    while current:
        if current in lines:
            return lines[current]
        cut = max(current.rfind("."), current.rfind("["))
        current = current[:cut] if cut > 0 else ""
    return lines.get("(document)")


def parse(text: str, source: str) -> tuple[Any, dict[str, int], list[FieldError]]:
    """The document, a map field path -> line, and duplicate-key errors.

    Syntax errors raise: nothing else can be said about a file that does not parse.
    """
    if len(text) > MAX_FILE_BYTES:
        raise ValidationError(
            f"{source} is larger than {MAX_FILE_BYTES} bytes",
            errors=[FieldError("(document)", "split it into several rollout files")],
        )
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            nodes, chars = _expanded_size(node)
            if nodes > MAX_NODES or chars > MAX_SCALAR_CHARS:
                raise ValidationError(
                    f"{source} expands past the limit of {MAX_NODES} nodes / "
                    f"{MAX_SCALAR_CHARS} characters (YAML anchors and aliases)",
                    errors=[
                        FieldError(
                            "(document)",
                            "expands past the size limit through anchors/aliases; "
                            "write the values out or use fewer aliases",
                            node.start_mark.line + 1,
                        )
                    ],
                )
        doc = loader.construct_document(node) if node is not None else None
        lines: dict[str, int] = {}
        errors: list[FieldError] = []
        if node is not None:
            _walk(node, "", lines, errors)
    except RecursionError as e:
        raise ValidationError(
            f"{source} is nested too deeply",
            errors=[FieldError("(document)", "is nested too deeply; flatten it")],
        ) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise ValidationError(
            f"{source} is not valid YAML or JSON",
            errors=[FieldError("(document)", str(problem), line)],
        ) from e
    finally:
        loader.dispose()
    return doc, lines, errors


@dataclass(frozen=True)
class RolloutFile:
    path: Path
    document: RolloutDocument
    release_file: Path | None  # set when `release:` names a release TOML


def read_name(path: Path) -> str | None:
    """The file's `name:` if it parses within the limits (for listings), else None."""
    try:
        doc, _, _ = parse(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError, ValidationError):
        return None
    name = doc.get("name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) and name else None


def load(path: Path) -> RolloutFile:
    """Parse and validate a rollout file; ValidationError (exit 7) lists every problem."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValidationError(f"cannot read rollout file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ValidationError(f"rollout file {path} is not UTF-8 text: {e.reason}") from e
    doc, lines, errors = parse(text, str(path))
    errors += [
        FieldError(e.field, e.message, line_of(e.field, lines))
        for e in schemas.errors_of(rollout.SCHEMA, doc) + policy.document_errors(doc)
    ]
    release_file: Path | None = None
    release = doc.get("release") if isinstance(doc, dict) else None
    if isinstance(release, str) and release.endswith(".toml"):
        release_file = (path.parent / release).resolve()
        try:
            flake.read_toml(release_file)
        except ValidationError as e:
            detail = "; ".join(str(x) for x in e.errors) or e.detail
            errors.append(FieldError("release", f"{release}: {detail}", line_of("release", lines)))
    if errors:
        raise ValidationError(f"invalid rollout file {path}: {len(errors)} error(s)", errors=errors)
    return RolloutFile(path, doc, release_file)


def with_release_id(rf: RolloutFile) -> tuple[RolloutDocument, Release | None]:
    """The document with `release:` as an id, and the Release read from its file (if any)."""
    if rf.release_file is None:
        return rf.document, None
    release = flake.read_toml(rf.release_file)
    return {**rf.document, "release": release.id}, release
