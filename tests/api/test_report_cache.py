"""The report path's memory (api.report_cache), in one process, its thread not started:
the test decides when the view catches up and when last-seen times are written."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import falcon.testing
import pytest

from nixfleet.api import create_app
from nixfleet.api.report_cache import ReportCache
from nixfleet.settings import Settings
from nixfleet.store import Store

GEN = "/nix/store/" + "a" * 32 + "-nixos-system-web-01"
GEN2 = "/nix/store/" + "b" * 32 + "-nixos-system-web-01"
HEALTH = {
    "all_passed": True,
    "results": [
        {"name": "nginx", "kind": "systemd", "passed": True, "duration_ms": 3, "message": ""}
    ],
}
BODY: dict[str, Any] = {
    "current_generation": GEN,
    "tags": ["prod"],
    "success": True,
    "message": "running",
    "health": HEALTH,
    "agent_version": "0.1.0",
    "uptime_seconds": 10,
}


class Env:
    def __init__(self, store: Store, admin_key: str) -> None:
        self.store = store
        self.cache = ReportCache(store, default_poll_interval=60)
        self.client = falcon.testing.TestClient(
            create_app(Settings(default_poll_interval=60), store, self.cache)
        )
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        r = self.client.simulate_post(
            "/api/v1/machines",
            json={"id": "web-01", "tags": ["region-eu"], "issue_token": True},
            headers=self.admin,
        )
        assert r.status_code == 201, r.text
        self.token: str = r.json["token"]

    def report(self, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
        return self.client.simulate_post(
            "/api/v1/machines/web-01/report",
            json=body or BODY,
            headers={"Authorization": f"Bearer {token or self.token}"},
        )

    def row(self) -> dict[str, Any]:
        """The machine's row and its history, read on a connection of its own."""
        conn = sqlite3.connect(self.store.path)
        conn.row_factory = sqlite3.Row
        row = dict(conn.execute("SELECT * FROM machines WHERE id = 'web-01'").fetchone())
        row["events"] = conn.execute("SELECT count(*) FROM machine_events").fetchone()[0]
        conn.close()
        return row

    def warm(self) -> None:
        """A stored report, then the view catches up (what its thread does)."""
        r = self.report()
        assert r.status_code == 200, r.text
        self.cache.load()
        self.cache.catch_up()


@pytest.fixture
def env(store: Store, admin_key: str) -> Iterator[Env]:
    e = Env(store, admin_key)
    yield e
    e.cache.close()


def test_a_heartbeat_writes_nothing_until_its_batch(env: Env) -> None:
    env.warm()
    before = env.row()
    watch = sqlite3.connect(env.store.path)  # its data_version moves with any commit
    version = watch.execute("PRAGMA data_version").fetchone()[0]
    r = env.report({**BODY, "uptime_seconds": 70})
    assert r.status_code == 200
    assert env.cache.heartbeats == 1
    # Nothing committed, no row changed.
    assert watch.execute("PRAGMA data_version").fetchone()[0] == version
    watch.close()
    assert env.row() == before
    env.cache.flush()  # what the thread does within FLUSH_AFTER
    after = env.row()
    assert after["last_report_at"] > before["last_report_at"]
    assert after["uptime_seconds"] == 70
    assert {k: v for k, v in after.items() if k not in ("last_report_at", "uptime_seconds")} == {
        k: v for k, v in before.items() if k not in ("last_report_at", "uptime_seconds")
    }


def test_the_answer_from_memory_is_the_transactions(env: Env) -> None:
    r = env.client.simulate_put(
        "/api/v1/machines/web-01/desired-generation",
        json={"store_path": GEN2, "cache_url": "https://cache.example"},
        headers=env.admin,
    )
    assert r.status_code == 200, r.text
    stored = env.report()
    env.cache.load()
    from_memory = env.report()
    assert env.cache.heartbeats == 1
    assert from_memory.json == stored.json
    assert from_memory.json["desired_generation"] == GEN2
    assert from_memory.json["poll_hint"] == 60


def test_a_changed_report_is_committed_before_its_answer(env: Env) -> None:
    env.warm()
    seen: list[dict[str, Any]] = []
    original = env.store.transaction

    def watch() -> Any:  # a reader on another connection, right after COMMIT
        cm = original()

        class Wrapped:
            def __enter__(self) -> Any:
                return cm.__enter__()

            def __exit__(self, *exc: Any) -> Any:
                out = cm.__exit__(*exc)
                seen.append(env.row())
                return out

        return Wrapped()

    env.store.transaction = watch  # type: ignore[method-assign]
    try:
        r = env.report({**BODY, "current_generation": GEN2})
    finally:
        env.store.transaction = original  # type: ignore[method-assign]
    assert r.status_code == 200
    assert env.cache.heartbeats == 0
    assert seen and seen[0]["current_generation"] == GEN2
    assert env.row()["events"] == seen[0]["events"]


def test_any_commit_makes_reports_take_the_transaction_until_the_view_caught_up(
    env: Env,
) -> None:
    env.warm()
    assert env.report().status_code == 200 and env.cache.heartbeats == 1
    # Revoked: the next report is refused at once, before the view caught up.
    r = env.client.simulate_delete("/api/v1/machines/web-01/token", headers=env.admin)
    assert r.status_code in (200, 204), r.text
    assert env.report().status_code == 401
    env.cache.catch_up()
    assert env.report().status_code == 401
    assert env.cache.heartbeats == 1


def test_rotation_decommission_and_desired_reach_the_next_report(env: Env) -> None:
    env.warm()
    r = env.client.simulate_post("/api/v1/machines/web-01/token", headers=env.admin)
    assert r.status_code in (200, 201), r.text
    new = r.json["token"]
    assert env.report().status_code == 401  # the old token
    assert env.report(token=new).status_code == 200
    env.cache.catch_up()
    assert env.report().status_code == 401
    assert env.report(token=new).status_code == 200
    assert env.cache.heartbeats >= 1
    env.client.simulate_put(
        "/api/v1/machines/web-01/desired-generation",
        json={"store_path": GEN2},
        headers=env.admin,
    )
    assert env.report(token=new).json["desired_generation"] == GEN2
    env.cache.catch_up()
    n = env.cache.heartbeats
    assert env.report(token=new).json["desired_generation"] == GEN2
    assert env.cache.heartbeats == n + 1
    r = env.client.simulate_patch(
        "/api/v1/machines/web-01/lifecycle", json={"lifecycle": "decommissioned"}, headers=env.admin
    )
    assert r.status_code == 200, r.text
    assert env.report(token=new).status_code == 410
    env.cache.catch_up()
    assert env.report(token=new).status_code == 410


def test_a_write_that_bypasses_the_store_is_noticed_by_data_version(env: Env) -> None:
    env.warm()
    conn = sqlite3.connect(env.store.path)
    conn.execute("DELETE FROM machine_tokens")  # the sqlite3 shell: no counter moves
    conn.commit()
    conn.close()
    env.cache.catch_up()  # its thread does this every POLL seconds
    assert env.report().status_code == 401


def test_the_thread_catches_up_and_flushes_by_itself(env: Env) -> None:
    env.warm()
    env.cache.start()
    before = env.row()["last_report_at"]
    done = threading.Event()

    def until(condition: Any) -> bool:
        for _ in range(200):
            if condition():
                return True
            done.wait(0.01)
        return False

    # Each report after the view caught up is a heartbeat, and reaches the row in time.
    assert until(lambda: env.report().status_code == 200 and env.cache.heartbeats > 0)
    assert until(lambda: env.row()["last_report_at"] > before)


def test_a_change_to_one_machine_leaves_the_others_answered_from_memory(env: Env) -> None:
    r = env.client.simulate_post(
        "/api/v1/machines", json={"id": "web-02", "issue_token": True}, headers=env.admin
    )
    other = r.json["token"]

    def report_02() -> Any:
        return env.client.simulate_post(
            "/api/v1/machines/web-02/report",
            json=BODY,
            headers={"Authorization": f"Bearer {other}"},
        )

    assert report_02().status_code == 200
    env.warm()
    assert report_02().status_code == 200 and env.cache.heartbeats == 1
    # web-01 is decommissioned; the view has not caught up: web-01 is refused (from
    # SQLite), web-02 still answered from memory.
    env.client.simulate_patch(
        "/api/v1/machines/web-01/lifecycle", json={"lifecycle": "decommissioned"}, headers=env.admin
    )
    assert env.report().status_code == 410
    assert report_02().status_code == 200 and env.cache.heartbeats == 2


def test_when_a_batch_cannot_be_written_reports_take_the_transaction(env: Env) -> None:
    env.warm()
    assert env.report().status_code == 200 and env.cache.heartbeats == 1
    moved = env.store.path.with_suffix(".moved")
    env.store.path.rename(moved)  # the file replaced under the process: writes refused
    with pytest.raises(Exception, match="deleted"):
        env.cache.flush()
    assert env.report().status_code == 503  # not acknowledged from memory
    assert env.cache.heartbeats == 1
    moved.rename(env.store.path)
    env.cache.flush()  # the queued one is written after all
    assert env.report().status_code == 200 and env.cache.heartbeats == 2
