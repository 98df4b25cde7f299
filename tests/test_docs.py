"""The docs cannot drift: references are regenerated and compared, every command has an example."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gendocs  # noqa: E402

COMMANDS = gendocs.all_commands()


def test_cli_reference_is_current() -> None:
    assert (ROOT / "docs" / "cli.md").read_text() == gendocs.cli_reference(), (
        "docs/cli.md is stale: run `python tools/gendocs.py`"
    )


def test_api_reference_is_current() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == gendocs.api_reference(), (
        "docs/api.md is stale: run `python tools/gendocs.py`"
    )


@pytest.mark.parametrize(("path", "command", "ctx"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_has_help_with_an_example(path: str, command: object, ctx: object) -> None:
    help_text = command.get_help(ctx)  # type: ignore[attr-defined]
    assert "Example:" in help_text, f"`{path} --help` needs an Example: block"
    for param in command.params:  # type: ignore[attr-defined]
        if getattr(param, "help", None) is None and param.param_type_name == "option":
            raise AssertionError(f"{path}: option {param.opts} has no help text")


def test_every_docs_page_is_linked_from_the_index() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "index.md")
    missing = [p for p in pages if f"({p})" not in index]
    assert missing == [], f"docs/index.md does not link {missing}"


def test_relative_links_in_docs_resolve() -> None:
    for page in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
