"""Agent configuration: schema validation, precedence, transport and token rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nixfleet.agent.config import load_config, read_token
from nixfleet.agent.main import main
from nixfleet.errors import UsageError, ValidationError


def write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(doc))
    return path


def test_defaults_and_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            {
                "control_plane_url": "https://fleet.example.com/",
                "machine_id": "web-01",
                "tags": ["web", "prod"],
                "health_checks": {
                    "systemd": ["nginx.service"],
                    "http": [{"name": "site", "url": "http://127.0.0.1/"}],
                    "command": [{"name": "ok", "argv": ["true"]}],
                },
            },
        ),
        environ={},
    )
    assert cfg.control_plane_url == "https://fleet.example.com"
    assert cfg.poll_interval == 60 and cfg.backoff_initial == 5 and cfg.backoff_max == 300
    assert cfg.profile == "/nix/var/nix/profiles/system"
    assert cfg.current_system == "/run/current-system"
    assert cfg.state_dir == "/var/lib/nixfleet-agent"
    assert cfg.tags == ("web", "prod")
    assert cfg.health_checks.systemd == ("nginx.service",)
    assert cfg.health_checks.http[0].expected_status == 200
    assert cfg.health_checks.http[0].timeout == 10
    assert cfg.health_checks.command[0].argv == ("true",)
    assert not cfg.use_systemd_run and not cfg.dry_run and not cfg.allow_insecure


def test_flags_override_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "control_plane_url": "https://a.example.com",
            "machine_id": "a",
            "poll_interval": 30,
            "trusted_public_keys": ["k-1:AAAA"],
        },
    )
    cfg = load_config(
        path,
        {
            "machine_id": "b",
            "poll_interval": 2.5,
            "dry_run": None,
            "trusted_public_keys": ("k-2:BBBB",),
        },
        environ={},
    )
    assert cfg.machine_id == "b" and cfg.poll_interval == 2.5
    assert cfg.trusted_public_keys == ("k-2:BBBB",)
    assert not cfg.dry_run  # None means "flag not given"
    unchanged = load_config(path, {"trusted_public_keys": ()}, environ={})
    assert unchanged.trusted_public_keys == ("k-1:AAAA",)


def test_errors_name_each_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "control_plane_url": "ftp://x",
            "machine_id": "bad id",
            "poll_interval": 0,
            "pol_interval": 5,
            "health_checks": {
                "http": [{"name": "x", "url": "http://h", "expected_status": "200"}],
                "command": [{"name": "c"}],
            },
        },
    )
    with pytest.raises(ValidationError) as err:
        load_config(path, environ={})
    fields = {e.field for e in err.value.errors}
    assert fields == {
        "control_plane_url",
        "machine_id",
        "poll_interval",
        "pol_interval",
        "health_checks.http[0].expected_status",
        "health_checks.command[0].argv",
    }
    unknown = next(e for e in err.value.errors if e.field == "pol_interval")
    assert "allowed fields" in unknown.message and "poll_interval" in unknown.message


def test_flag_values_are_validated_too() -> None:
    with pytest.raises(ValidationError) as err:
        load_config(
            None, {"control_plane_url": "https://x.example", "machine_id": "no spaces"}, environ={}
        )
    assert [e.field for e in err.value.errors] == ["machine_id"]


def test_control_plane_url_is_required() -> None:
    with pytest.raises(ValidationError) as err:
        load_config(None, {"machine_id": "m"}, environ={})
    assert err.value.errors[0].field == "control_plane_url"


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  'x': 1\n}")
    with pytest.raises(ValidationError) as err:
        load_config(bad, environ={})
    assert err.value.errors[0].line == 2
    with pytest.raises(UsageError):
        load_config(tmp_path / "missing.json", environ={})


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:8080", True),
        ("http://localhost:8080", True),
        ("http://[::1]:8080", True),
        ("https://fleet.example.com", True),
        ("http://fleet.example.com", False),
        ("http://10.0.0.5:8080", False),
    ],
)
def test_plain_http_only_to_loopback(url: str, allowed: bool) -> None:
    overrides = {"control_plane_url": url, "machine_id": "m"}
    if allowed:
        load_config(None, overrides, environ={})
    else:
        with pytest.raises(UsageError, match="allow_insecure"):
            load_config(None, overrides, environ={})
        load_config(None, {**overrides, "allow_insecure": True}, environ={})


def test_token_lookup_order(tmp_path: Path) -> None:
    state = tmp_path / "state"
    creds = tmp_path / "creds"
    state.mkdir()
    creds.mkdir()
    base = {"control_plane_url": "https://x.example", "machine_id": "m", "state_dir": str(state)}
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert read_token(load_config(None, base, environ=env)) is None
    (state / "token").write_text("from-state\n")
    assert read_token(load_config(None, base, environ=env)) == "from-state"
    (creds / "token").write_text("from-credentials\n")
    assert read_token(load_config(None, base, environ=env)) == "from-credentials"
    (tmp_path / "tok").write_text("from-file\n")
    cfg = load_config(None, {**base, "token_file": str(tmp_path / "tok")}, environ=env)
    assert read_token(cfg) == "from-file"


def test_cli_reports_config_errors_with_exit_code(tmp_path: Path) -> None:
    path = write(tmp_path, {"control_plane_url": "https://x.example", "bogus": 1})
    result = CliRunner().invoke(main, ["--config", str(path), "--once"])
    assert result.exit_code == 7
    assert "bogus: unknown field" in result.output
    insecure = CliRunner().invoke(
        main, ["--control-plane-url", "http://fleet.example.com", "--machine-id", "m", "--once"]
    )
    assert insecure.exit_code == 2 and "refusing plain http://" in insecure.output
