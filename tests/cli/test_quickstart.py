"""A new user's first steps: a lone clone passes, and docs/quickstart.md works as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from ports import free_port

BIN = Path(sys.executable).parent


def quickstart_block() -> str:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    section = text.split("## Your own control plane, step by step", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "docs/quickstart.md lost its step-by-step block"
    return match.group(1)


def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    script = quickstart_block().replace("8470", str(free_port()))
    env = {
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "LANG": "C.UTF-8",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    work = home / "nixfleet-quickstart"
    assert "no machines yet" in done.stderr
    assert "web-01" in done.stdout and "no desired" in done.stdout
    assert "no machine has a desired generation yet" in done.stderr
    for secret in ("ops.key", "web-01.token", "ci.key"):
        assert (work / secret).stat().st_mode & 0o777 == 0o600, secret
        assert (work / secret).read_text().strip() not in done.stdout + done.stderr
    status = json.loads((work / "status.json").read_text())
    assert [m["id"] for m in status["machines"]] == ["db-01", "web-01"]
    config = (home / ".config" / "nixfleet" / "config.toml").read_text()
    assert 'current_context = "local"' in config and str(work / "ops.key") in config


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and ((ROOT / f).is_file() or (ROOT / f).is_symlink())]


LONE_TESTS = ["tests/test_docs.py", "tests/nix/test_real_lib.py"]
LIB_SKIP = "no nixpkgs lib: NIXFLEET_NIXPKGS_LIB is unset and the flake's nixpkgs input"


@pytest.mark.long
def test_a_lone_clone_passes(tmp_path: Path) -> None:
    """README's two commands need nothing beside the clone (no ../shared, no sibling).

    A copy of the tracked files is placed alone in an empty directory and README's
    commands run in it, literally `./dev demo` and `./dev test`, bounded: the demo
    fleet (2 machines) to completion, then `./dev test` (ruff, ruff format, mypy over
    the whole copy) with the tests that depend on what surrounds the repository —
    the docs checks (every link of README and docs/ resolves inside the copy) and the
    real-nixpkgs-lib module tests, which must skip naming the reason (no ../shared,
    nothing to fetch offline). NIXFLEET_DEV_VENV points `./dev` at this checkout's
    already set-up venv, so nothing is downloaded; the copy's own package runs (it
    comes first on PYTHONPATH: asserted by the bytecode its imports leave in the copy).
    """
    lone = tmp_path / "alone" / "nixfleet"
    for name in tracked_files():
        target = lone / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)  # as git checks them out
    assert sorted(p.name for p in lone.parent.iterdir()) == ["nixfleet"]
    assert not (lone / ".venv").exists() and not (lone.parent.parent / "shared").exists()
    for page in [lone / "README.md", *(lone / "docs").glob("*.md")]:
        assert "../shared" not in page.read_text(), f"{page.name} points outside the clone"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NIXFLEET_") and k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    }
    env["NIXFLEET_DEV_VENV"] = str(BIN.parent)

    demo = subprocess.run(
        ["./dev", "demo", "--machines", "2"],
        cwd=lone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "rollout-completed" in demo.stdout + demo.stderr
    last = demo.stdout.rstrip().splitlines()[-1]
    assert last.startswith("1/2 machines in sync, 1 failed; health: ")  # canary caught
    assert (lone / "nixfleet" / "__pycache__").is_dir(), "the demo did not run the copy"

    test = subprocess.run(
        ["./dev", "test", "-p", "no:cacheprovider", "-rs", *LONE_TESTS],
        cwd=lone,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    out = test.stdout + test.stderr
    assert test.returncode == 0, test.stdout[-4000:] + test.stderr[-2000:]
    assert "Success: no issues found" in out  # mypy ran over the copy
    summary = re.search(r"(\d+) passed, (\d+) skipped", out)
    assert summary, out[-2000:]
    assert int(summary.group(1)) >= 50 and int(summary.group(2)) >= 10, summary.group(0)
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(LIB_SKIP in line and "NIXFLEET_NIXPKGS_LIB=" in line for line in skips)

    usage = subprocess.run(["./dev"], cwd=lone, capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "./dev test" in usage.stdout + usage.stderr
    ci = (lone / ".ci" / "run").read_text()
    readme = (lone / "README.md").read_text()
    assert "./dev test" in readme and "./dev demo" in readme
    assert "exec ./dev test" in ci  # CI runs README's command
