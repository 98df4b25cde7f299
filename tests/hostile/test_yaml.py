"""YAML anchor/alias bombs are refused before they expand (issue 14, part 1).

A 400-byte file whose aliases expand to ~400 million nodes used to take ~14 s and
1.7 GB in `nixfleet rollout validate` and in the GitOps watcher, which then stored a
25 MB error row. Now both refuse it as invalid input, with a short error. Both run
under an address-space limit (512 MiB) so an expansion would fail them.
"""

from __future__ import annotations

import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, ControlPlane
from ports import free_port

from hostile.wire import raw
from nixfleet import rolloutfile
from nixfleet.errors import ValidationError

LEVELS = "abcdefghi"


def bomb(levels: str = LEVELS) -> str:
    """Nine levels of nine aliases: 9**9 = 387,420,489 strings once expanded."""
    lines = [
        'a: &a ["web-01","web-01","web-01","web-01","web-01","web-01","web-01","web-01","web-01"]'
    ]
    for prev, cur in itertools.pairwise(levels):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    body = "\n".join("  " + line for line in lines)
    return (
        "version: 1\nname: laughs\nrelease: rel-0123456789ab\nstrategy: all-at-once\n"
        f"x-anchors:\n{body}\ntarget:\n  hosts: *{levels[-1]}\n"
    )


def _limit_memory() -> None:
    limit = 512 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_the_bomb_is_small() -> None:
    assert len(bomb()) < 1024


def test_parse_refuses_expansion_and_recursion() -> None:
    with pytest.raises(ValidationError) as e:
        rolloutfile.parse(bomb(), "bomb.yaml")
    assert "anchors" in e.value.errors[0].message
    # An alias inside its own anchor (PyYAML composes it into a cycle).
    with pytest.raises(ValidationError):
        rolloutfile.parse("a: &a [*a]\n", "cycle.yaml")
    with pytest.raises(ValidationError) as deep:
        rolloutfile.parse("a: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")
    assert "nested too deeply" in deep.value.detail
    # Aliases that stay small are fine.
    doc, _, errors = rolloutfile.parse(bomb("abc"), "small.yaml")
    assert errors == [] and len(doc["target"]["hosts"]) == 9


def test_cli_validate_refuses_the_bomb_with_exit_7(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())
    proc = subprocess.run(
        [sys.executable, "-m", "nixfleet.cli", "rollout", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_memory,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert "anchors/aliases" in proc.stderr
    assert len(proc.stderr) < 4096 and "Traceback" not in proc.stderr


def test_gitops_records_the_bomb_as_invalid_and_applies_the_rest(
    tmp_path: Path, control_plane: ControlPlane
) -> None:
    control_plane.stop()
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    (rollouts / "bomb.yaml").write_text(bomb())
    (rollouts / "broken.yaml").write_text("version: 1\nname: broken\nstrategy: sideways\n")
    control_plane.extra_args = ["--rollouts-dir", str(rollouts), "--reconcile-interval", "0.2"]
    control_plane.port = free_port()
    control_plane.start()
    url = control_plane.url
    deadline = time.monotonic() + 60
    listing: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = raw(url, "GET", "/api/v1/rollouts", token=control_plane.admin_key)
        assert answer.status == 200
        listing = {r["name"]: r for r in answer.json()["rollouts"]}
        if {"bomb", "broken"} <= set(listing):
            break
        time.sleep(0.2)
    assert listing["bomb"]["status"] == "invalid", listing
    assert "anchors/aliases" in json.dumps(listing["bomb"]["errors"])
    assert len(json.dumps(listing["bomb"]["errors"])) < 4096
    assert listing["broken"]["status"] == "invalid"
    # The watcher is still alive and the CP answers.
    assert raw(url, "GET", "/health").status == 200
