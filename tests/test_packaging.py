"""The wheel ships the JSON Schemas, the migrations' SQL and py.typed, and works from a fresh
venv."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from conftest import ROOT


def test_wheel_ships_schemas_and_validates_with_them(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            ROOT,
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("nixfleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("nixfleet/schemas/")}
    assert shipped == {p.name for p in (ROOT / "schemas").glob("*.json")}
    assert "nixfleet/py.typed" in names
    sql_dir = ROOT / "nixfleet" / "store" / "sql"  # SQLite's, and postgresql/ beside them
    sql = {
        n.removeprefix("nixfleet/store/sql/") for n in names if n.startswith("nixfleet/store/sql/")
    }
    assert sql == {p.relative_to(sql_dir).as_posix() for p in sql_dir.rglob("*.sql")} != set()
    assert "postgresql/0001_api_keys_audit.sql" in sql

    env_dir = tmp_path / "venv"
    # The dependencies come from this interpreter's site-packages; nixfleet itself only
    # from the wheel (--no-deps, and we check the imported file lives in the venv).
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel],
        check=True,
        timeout=300,
    )
    script = (
        "import nixfleet, nixfleet.schemas as s, nixfleet.store.migrations as m\n"
        "assert len(m.MIGRATIONS) > 12 and all(sql.strip() for _, sql in m.MIGRATIONS)\n"
        "assert nixfleet.__file__.startswith(%r), nixfleet.__file__\n"
        "s.validate('report', {'current_generation': '/nix/store/' + 'a' * 32 + '-x'})\n"
        "try:\n"
        "    s.validate('report', {'current_generation': 'nope'})\n"
        "except Exception as e:\n"
        "    print(e.errors[0].field)\n"
    ) % str(env_dir)
    out = subprocess.run(
        [py, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "current_generation"
