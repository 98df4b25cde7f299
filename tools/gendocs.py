"""Generate docs/cli.md from the Click tree and docs/api.md from the OpenAPI document.

Run `python tools/gendocs.py` after changing a command, option or route;
tests/test_docs.py fails while the committed files differ from what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nixfleet.agent.main import main as agent_main  # noqa: E402
from nixfleet.api.app import ROUTES  # noqa: E402
from nixfleet.api.openapi import document  # noqa: E402
from nixfleet.cli.main import cli  # noqa: E402
from nixfleet.controlplane.main import cli as cp_cli  # noqa: E402

PROGRAMS: list[tuple[str, click.Command]] = [
    ("nixfleet", cli),
    ("nixfleet-control-plane", cp_cli),
    ("nixfleet-agent", agent_main),
]


Entry = tuple[str, click.Command, click.Context]


def walk(name: str, command: click.Command, parent: click.Context | None = None) -> list[Entry]:
    """Every command under `command`, depth first, with its full name."""
    # The command's own context_settings (e.g. -h as a help option), as when it runs.
    settings = {"terminal_width": 100, "max_content_width": 100, **command.context_settings}
    ctx = click.Context(command, info_name=name, parent=parent, **settings)
    found = [(ctx.command_path, command, ctx)]
    if isinstance(command, click.Group):
        for sub in sorted(command.list_commands(ctx)):
            child = command.get_command(ctx, sub)
            if child is not None and not child.hidden:
                found.extend(walk(sub, child, ctx))
    return found


def all_commands() -> list[Entry]:
    return [entry for name, command in PROGRAMS for entry in walk(name, command)]


def cli_reference() -> str:
    out = [
        "# CLI reference",
        "",
        "Generated from `--help` by `python tools/gendocs.py`; do not edit by hand.",
        "",
        "Exit codes (all programs): 0 ok · 1 error · 2 usage · 3 not found · 4 conflict ·",
        "5 control plane unreachable · 6 authentication/authorization · 7 invalid input file ·",
        "8 rollout paused/failed while waiting · 130 interrupted (Ctrl-C) · 141 output pipe closed",
        "(`nixfleet status | head -1`). `--debug` adds the traceback to any error.",
        "",
        'Shell completion (bash, zsh, fish): `eval "$(nixfleet completion bash)"` in `~/.bashrc`',
        "(see `nixfleet completion`); machine ids, tags, rollout names and release ids complete",
        "from the control plane. The Nix package installs all three completion files (its",
        "derivation is checked against a stub nixpkgs only, `tests/test_nix_packaging.py`:",
        "a full nixpkgs cannot be had offline here, so no real build has installed them yet).",
        "",
        "Configuration: flags > `--context`/`NIXFLEET_CONTEXT` > environment > the current",
        "context of `~/.config/nixfleet/config.toml` (see `nixfleet config`) > defaults.",
        "",
    ]
    for path, command, ctx in all_commands():
        out += [f"## `{path}`", "", "```", command.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(out)


def api_reference() -> str:
    doc: dict[str, Any] = document(ROUTES)
    out = [
        "# HTTP API reference",
        "",
        "Generated from the OpenAPI document (`GET /api/v1/openapi.json`) by",
        "`python tools/gendocs.py`; do not edit by hand. Bodies are JSON; errors are",
        "`application/problem+json` with `type`, `title`, `status`, `detail` and, for invalid",
        "input, `errors: [{field, message}]`. Credentials: `Authorization: Bearer <key or token>`.",
        "",
        "| method | path | who may call | what it does | request body schema |",
        "|---|---|---|---|---|",
    ]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            ref = body.get("schema", {}).get("$ref", "")
            schema = f"`schemas/{ref.rsplit('/', 1)[-1]}.schema.json`" if ref else "-"
            who = op["x-nixfleet-permission"]
            out.append(f"| {method.upper()} | `{path}` | {who} | {op['summary']} | {schema} |")
    out += [
        "",
        "Who may call: `public` needs no credentials; `readonly` ⊂ `deploy` ⊂ `admin` are",
        "operator API key roles; `agent` is the machine token of the machine in the path;",
        "`agent-or-readonly` accepts either.",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    (ROOT / "docs" / "cli.md").write_text(cli_reference())
    (ROOT / "docs" / "api.md").write_text(api_reference())
    print("wrote docs/cli.md and docs/api.md")


if __name__ == "__main__":
    main()
