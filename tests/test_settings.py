"""Control-plane settings: defaults < file < flags, and every bad value named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nixfleet import settings as config
from nixfleet.errors import ValidationError


def test_file_overrides_defaults_and_flags_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "settings.json"
    f.write_text(json.dumps({"threads": 4, "workers": 2, "stale_after": 60}))
    s = config.load(f, workers=3, threads=None)
    assert (s.threads, s.workers, s.stale_after) == (4, 3, 60)
    assert config.load().workers == 1


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"workers": 65}, "workers"),
        ({"workers": True}, "workers"),
        ({"threads": 0}, "threads"),
        ({"listen": "localhost"}, "listen"),
        ({"reconcile_interval": 0}, "reconcile_interval"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, data: dict[str, object], field: str) -> None:
    f = tmp_path / "settings.json"
    f.write_text(json.dumps(data))
    with pytest.raises(ValidationError) as e:
        config.load(f)
    assert [fe.field for fe in e.value.errors] == [field]


def test_a_bad_flag_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nixfleet.controlplane.main",
            "--db",
            str(tmp_path / "x.db"),
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2 and "--workers" in r.stderr
    assert not (tmp_path / "x.db").exists()
