"""The demo fleet on PostgreSQL: two control-plane replicas, one database (DESIGN §13)."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli

from nixfleet.database_url import parse
from nixfleet.store import open_store


def test_demo_on_postgresql_converges_with_two_replicas(tmp_path: Path, postgres_url: str) -> None:
    root = tmp_path / "demo"
    r = run_cli("demo", "--machines", "4", "--dir", str(root), "--database-url", postgres_url)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "2 control planes on PostgreSQL" in out
    assert out.index("batch-started: batch 1") < out.index("rollout-completed")
    assert "4/4 machines in sync" in r.stdout
    assert "rolled back: switch to" in out and "rollout-paused" in out
    assert r.stdout.rstrip().endswith("3/4 machines in sync, 1 failed; health: 4 healthy")
    # Both replicas served agents (each logged reports), and one of them led.
    logs = [root / "control-plane.log", root / "control-plane-2.log"]
    assert all(log.exists() for log in logs)
    store = open_store(parse(postgres_url))
    try:
        with store.read() as conn:
            row = conn.execute("SELECT epoch, holder FROM leadership WHERE id = 1").fetchone()
            machines = conn.execute("SELECT count(*) AS n FROM machines").fetchone()
    finally:
        store.close()
    assert row is not None and row["epoch"] >= 1 and row["holder"]
    assert machines is not None and machines["n"] == 4


def test_demo_refuses_replicas_without_postgresql() -> None:
    r = run_cli("demo", "--replicas", "2")
    assert r.returncode == 2
    assert "--replicas" in r.stderr and "PostgreSQL" in r.stderr


def test_demo_refuses_a_database_url_that_is_not_postgresql(tmp_path: Path) -> None:
    r = run_cli("demo", "--database-url", f"sqlite:{tmp_path}/x.db")
    assert r.returncode == 2
    assert "--database-url" in r.stderr and "postgresql://" in r.stderr
