"""The house rules a grep can hold (DESIGN §2, rules 2, 7, 9, 10): no import loop among
the package's modules, SQL only in store/, API paths only in the client and the API, no
module past ~600 lines, one free-form JSON object type. Read as text and ASTs; nothing
is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nixfleet"
MAX_LINES = 600


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports when it is loaded (module level, no
    TYPE_CHECKING blocks; imports inside functions are deliberate and lazy)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found |= {
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            }
    return {m for m in found if m in known and m != name}


def cycle() -> list[str] | None:
    """One import loop, as the modules along it, or None."""
    known = modules()
    graph = {name: imports(name, path, set(known)) for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*path[path.index(w) :], w]
            if w not in state and (found := visit(w)) is not None:
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)) is not None:
            return found
    return None


def test_the_package_has_no_import_loop() -> None:
    assert cycle() is None, " -> ".join(cycle() or [])


SQL = re.compile(
    r"\b(SELECT .* FROM|INSERT INTO|UPDATE \w+ SET|DELETE FROM|CREATE (TABLE|INDEX|TRIGGER)"
    r"|ALTER TABLE|PRAGMA \w+)\b"
)


def literal_lines(path: Path, pattern: re.Pattern[str] = SQL) -> list[int]:
    """Lines of the string literals in `path` that match (docstrings are prose)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and pattern.search(node.value)
    ]


def test_sql_lives_in_store_only() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in PACKAGE.rglob("*.py")
        if "store" not in path.relative_to(PACKAGE).parts
        for line in literal_lines(path)
    ]
    assert found == []


def test_the_sql_check_sees_sql() -> None:
    assert literal_lines(PACKAGE / "store" / "report_cache.py") != []


def test_only_the_client_and_the_api_spell_api_paths() -> None:
    """DESIGN rule 10: the CLI and the agent call the typed client, never build a URL."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "client.py" and "api" not in path.relative_to(PACKAGE).parts
        for line in literal_lines(path, re.compile("/api/v1/"))
    ]
    assert found == []


def test_no_module_is_past_the_split_size() -> None:
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_free_form_json_objects_have_one_spelling() -> None:
    """`wire.JSONObject` is the one `dict[str, Any]`; fixed shapes are TypedDicts."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{i}"
        for path in PACKAGE.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "dict[str, Any]" in line
    ]
    assert found == ["nixfleet/wire.py:15"]
