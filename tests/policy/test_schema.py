"""The §11 rollout fields in the schema: accepted, or refused with field and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from nixfleet import policy, rolloutfile, schemas
from nixfleet.errors import ValidationError

HEAD = (
    "version: 1\nname: db\nrelease: rel-000000000000\ntarget: {tags: [db]}\nstrategy: all-at-once\n"
)
BASE: dict[str, Any] = {
    "version": 1,
    "name": "db",
    "release": "rel-000000000000",
    "target": {"tags": ["db"]},
    "strategy": "all-at-once",
}


def refused(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + text)
    with pytest.raises(ValidationError) as e:
        rolloutfile.load(path)
    return [str(x) for x in e.value.errors]


def test_valid_policy_fields_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        HEAD
        + "max_unavailable: 10%\nreboot: when-needed\nwindows:\n"
        + "  - {days: [mon, tue, wed, thu], start: '09:00', end: '16:00', timezone: Europe/Berlin}\n"
        + "  - {days: [sat], start: '22:00', end: '02:00'}\n"
    )
    doc = rolloutfile.load(path).document
    p = policy.from_document(doc)
    assert p.max_unavailable is not None and str(p.max_unavailable) == "10%"
    assert len(p.windows) == 2
    schemas.validate("rollout", {**BASE, "max_unavailable": 2, "reboot": "never"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_unavailable: 0\n", "max_unavailable (line 6)"),
        ("max_unavailable: 150%\n", "max_unavailable (line 6)"),
        ("reboot: always\n", "reboot (line 6)"),
        ("windows: []\n", "windows (line 6)"),
        ("windows:\n  - {start: '9:00', end: '16:00'}\n", "windows[0].start (line 7)"),
        ("windows:\n  - {start: '09:00'}\n", "windows[0].end (line 7)"),
        (
            "windows:\n  - {days: [monday], start: '09:00', end: '16:00'}\n",
            "windows[0].days[0] (line 7)",
        ),
        ("windows:\n  - {start: '09:00', end: '16:00', tz: UTC}\n", "windows[0].tz (line 7)"),
        (
            "windows:\n  - {start: '09:00', end: '16:00'}\n  - {start: '09:00', end: '16:00', timezone: Mars/Olympus}\n",
            "windows[1].timezone (line 8)",
        ),
        ("windows:\n  - {start: '09:00', end: '09:00'}\n", "windows[0].end (line 7)"),
    ],
)
def test_bad_policy_fields_name_field_and_line(text: str, expected: str, tmp_path: Path) -> None:
    errors = refused(text, tmp_path)
    assert any(e.startswith(expected) for e in errors), errors


def test_the_api_path_refuses_an_unknown_zone_too() -> None:
    from nixfleet.store.planning import spec_of

    doc = {**BASE, "windows": [{"start": "09:00", "end": "16:00", "timezone": "Nowhere/City"}]}
    with pytest.raises(ValidationError) as e:
        spec_of(doc)
    assert [x.field for x in e.value.errors] == ["windows[0].timezone"]


def test_cli_validate_reports_field_and_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + "windows:\n  - {start: '09:00', end: '16:00', timezone: Mars/Olympus}\n")
    r = run_cli("rollout", "validate", str(path))
    assert r.returncode == 7, r.stderr
    assert "windows[0].timezone (line 7)" in r.stderr
    assert "Traceback" not in r.stderr
