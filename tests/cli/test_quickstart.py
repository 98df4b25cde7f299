"""A new user's first steps: a lone clone passes, and docs/quickstart.md works as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port

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


def test_a_lone_clone_passes(tmp_path: Path) -> None:
    """README's commands need nothing beside the clone (no ../shared, no sibling checkout).

    The essentials of `./dev test` that depend on what surrounds the repository run in
    a copy placed alone in an empty directory: the docs checks (every link of README and
    docs/ resolves inside the copy, the references are current) with the copy's own
    package, and `./dev` itself parses and answers.
    """
    lone = tmp_path / "alone" / "nixfleet"
    for name in tracked_files():
        target = lone / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)  # as git checks them out
    assert sorted(p.name for p in lone.parent.iterdir()) == ["nixfleet"]
    for page in [lone / "README.md", *(lone / "docs").glob("*.md")]:
        assert "../shared" not in page.read_text(), f"{page.name} points outside the clone"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIXFLEET_")}
    env["PYTHONPATH"] = str(lone)
    which = subprocess.run(
        [sys.executable, "-c", "import nixfleet; print(nixfleet.__file__)"],
        cwd=lone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert which.stdout.strip() == str(lone / "nixfleet" / "__init__.py")
    docs = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_docs.py"],
        cwd=lone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert docs.returncode == 0, docs.stdout[-3000:] + docs.stderr[-2000:]
    usage = subprocess.run(["./dev"], cwd=lone, capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "./dev test" in usage.stdout + usage.stderr
    ci = (lone / ".ci" / "run").read_text()
    readme = (lone / "README.md").read_text()
    assert "./dev test" in readme and "exec ./dev test" in ci  # CI runs README's command
