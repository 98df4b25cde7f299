"""`database_url` (settings, --database-url): SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

from nixfleet import database_url
from nixfleet import settings as config
from nixfleet.database_url import DatabaseURL
from nixfleet.errors import ValidationError


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("fleet.db", "fleet.db"),
        ("/var/lib/nixfleet/nixfleet.db", "/var/lib/nixfleet/nixfleet.db"),
        ("sqlite:fleet.db", "fleet.db"),
        ("sqlite:/var/lib/x.db", "/var/lib/x.db"),
        ("sqlite:///var/lib/x.db", "/var/lib/x.db"),
        ("SQLite:x.db", "x.db"),
        ("C:odd-but-a-file.db", "C:odd-but-a-file.db"),
    ],
)
def test_sqlite_urls_and_plain_paths_are_sqlite_files(text: str, path: str) -> None:
    assert database_url.parse(text) == DatabaseURL("sqlite", path=Path(path))


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://nixfleet@db.example/nixfleet",
        "postgres://nixfleet@127.0.0.1:5432/nixfleet",
        "postgresql:///nixfleet?host=/run/postgresql",
        "postgresql://nixfleet@[::1]:6432/fleet?sslmode=verify-full&application_name=cp",
        "postgresql://nixfleet@db/fleet?passfile=/run/credentials/cp/pgpass",
    ],
)
def test_postgresql_urls_are_kept_as_given(text: str) -> None:
    parsed = database_url.parse(text)
    assert parsed == DatabaseURL("postgresql", conninfo=text)
    assert parsed.display == text


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "expected sqlite:PATH"),
        ("sqlite:", "needs the database file's path"),
        ("mysql://u@h/db", "unknown scheme 'mysql'"),
        ("postgresql://u@h:99999/db", "port"),
        ("postgresql://u@h:abc/db", "port"),
        ("postgresql://u@h/db/extra", "one database"),
        ("postgresql://u@h/db#x", "fragment"),
        ("postgresql://u@h/db?bogus=1", 'libpq refuses it: invalid URI query parameter: "bogus"'),
        ("postgresql://u@h/my db", "spaces or control characters"),
        ("postgresql:u@h/db", "expected postgresql://"),
    ],
)
def test_a_malformed_url_is_refused_naming_the_field(text: str, says: str) -> None:
    with pytest.raises(ValidationError) as e:
        database_url.parse(text)
    [error] = e.value.errors
    assert error.field == "database_url"
    assert says in error.message


@pytest.mark.parametrize(
    "text",
    ["postgresql://u:s3cret@h/db", "postgresql://u@h/db?password=s3cret"],
)
def test_a_password_in_the_url_is_refused_and_never_repeated(text: str) -> None:
    with pytest.raises(ValidationError) as e:
        database_url.parse(text)
    assert "password" in str(e.value)
    assert "s3cret" not in str(e.value)


def test_settings_default_to_the_sqlite_file_and_take_a_url(tmp_path: Path) -> None:
    assert config.load().database.backend == "sqlite"
    assert config.load(db=str(tmp_path / "a.db")).db_path() == tmp_path / "a.db"
    s = config.load(database_url=f"sqlite:{tmp_path}/b.db")
    assert s.db_path() == tmp_path / "b.db"
    pg = config.load(database_url="postgresql://nixfleet@127.0.0.1/nixfleet")
    assert pg.database == DatabaseURL(
        "postgresql", conninfo="postgresql://nixfleet@127.0.0.1/nixfleet"
    )


def test_settings_name_the_field_of_a_bad_or_doubled_database(tmp_path: Path) -> None:
    f = tmp_path / "settings.json"
    f.write_text(json.dumps({"database_url": "postgresql://u@h:0/db"}))
    with pytest.raises(ValidationError) as e:
        config.load(f)
    assert [fe.field for fe in e.value.errors] == ["database_url"]
    with pytest.raises(ValidationError) as e:
        config.load(db="a.db", database_url="sqlite:b.db")
    assert [fe.field for fe in e.value.errors] == ["database_url"]
    assert "not both" in e.value.errors[0].message


def run_control_plane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nixfleet.controlplane.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_flag_opens_an_sqlite_url(tmp_path: Path) -> None:
    r = run_control_plane("--database-url", f"sqlite:{tmp_path}/x.db", "keys", "list")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x.db").exists()


def test_the_flag_refuses_a_malformed_url_naming_it(tmp_path: Path) -> None:
    r = run_control_plane("--database-url", "postgresql://u:pw@h/db", "keys", "list")
    assert r.returncode == 2
    assert "database_url" in r.stderr and "password" in r.stderr
    assert ":pw@" not in r.stderr


def test_the_flag_opens_a_postgresql_database(postgres_url: str) -> None:
    r = run_control_plane("--database-url", postgres_url, "keys", "create", "--name", "ops")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = run_control_plane("--database-url", postgres_url, "keys", "list")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ops\tadmin\t")
    r = run_control_plane("--database-url", postgres_url, "backup", "/nonexistent/x.db")
    assert r.returncode != 0
    assert "pg_dump" in r.stderr and "Traceback" not in r.stderr


def test_an_unreachable_postgresql_is_one_clear_line(tmp_path: Path) -> None:
    port = free_port()
    r = run_control_plane(
        "--database-url", f"postgresql://nixfleet@127.0.0.1:{port}/fleet", "keys", "list"
    )
    assert r.returncode != 0
    assert "database_url" in r.stderr or "PostgreSQL" in r.stderr, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr or "cannot connect" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_migrate_db_moves_a_control_plane_from_sqlite_to_postgresql(
    tmp_path: Path, postgres_url: str
) -> None:
    db = f"sqlite:{tmp_path}/fleet.db"
    r = run_control_plane("--database-url", db, "keys", "create", "--name", "ops")
    assert r.returncode == 0, r.stderr
    r = run_control_plane("migrate-db", "--from", db, "--to", postgres_url)
    assert r.returncode == 0, r.stderr
    r = run_control_plane("--database-url", postgres_url, "keys", "list")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ops\tadmin\t")
    again = run_control_plane("migrate-db", "--from", db, "--to", postgres_url)
    assert again.returncode == 4, again.stderr  # the target is no longer empty
    assert "Traceback" not in again.stderr
