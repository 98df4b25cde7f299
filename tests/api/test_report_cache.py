"""The report path's memory (api.report_cache), in one process, its thread not started:
the test decides when the view catches up and when last-seen times are written.

Through the API on SQLite; through the store on both backends (`View`), and across
two PostgreSQL replicas (two PgStores on one database), the view's thread running."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from conftest import wait_until

from nixfleet.api import create_app
from nixfleet.api.report_cache import ReportCache
from nixfleet.models import HealthResult, Lifecycle, Report, utcnow
from nixfleet.settings import Settings
from nixfleet.store import Store, credentials, machines
from nixfleet.store.conn import AnyStore

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
def store(tmp_path: Path) -> Iterator[Store]:
    """SQLite's store, not tests/api's any_store: `Env` tests SQLite's own mechanics (its
    data_version, the file itself); the view on both backends is `view` below."""
    s = Store(tmp_path / "nixfleet.db")
    yield s
    s.close()


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


# --- through the store, on both backends ---------------------------------------------


class View:
    """Two machines with tokens and a stored report each, and a view of `store`."""

    def __init__(self, store: AnyStore, writer: AnyStore | None = None) -> None:
        self.store = store
        self.writer = writer or store  # another replica's store, or the same
        self.tokens: dict[str, str] = {}
        with self.writer.transaction() as conn:
            for machine_id in ("web-01", "web-02"):
                machines.register(conn, machine_id, [], Lifecycle.ACTIVE, utcnow())
                self.tokens[machine_id] = credentials.issue_token(conn, machine_id, utcnow())
        for machine_id in self.tokens:
            self.store_report(machine_id)
        self.cache = ReportCache(store, default_poll_interval=60)

    def store_report(self, machine_id: str, body: dict[str, Any] | None = None) -> None:
        """What api.report stores when the view does not answer."""
        doc = body or BODY
        report = Report(
            machine_id=machine_id,
            received_at=utcnow(),
            current_generation=doc["current_generation"],
            success=doc["success"],
            message=doc["message"],
            health=HealthResult.from_dict(doc["health"]),
            tags=tuple(doc["tags"]),
            agent_version=doc["agent_version"],
            uptime_seconds=doc["uptime_seconds"],
        )
        with self.writer.transaction() as conn:
            machines.record_report(conn, report)

    def warm(self) -> None:
        wait_until("the changes published", lambda: self.store.published_changes() is not None)
        self.cache.load()
        self.cache.catch_up()

    def heartbeat(self, machine_id: str = "web-01", **body: Any) -> dict[str, Any] | None:
        """The answer from memory; None: the report takes the transaction (api.report)."""
        entry = self.cache.token_machine(self.tokens[machine_id])
        if entry is None:
            return None
        text = self.cache.heartbeat(machine_id, {**BODY, **body}, utcnow(), entry)
        return None if text is None else dict(json.loads(text))

    def last_seen(self) -> tuple[Any, Any]:
        with self.store.lookup() as conn:
            row = conn.execute(
                "SELECT last_report_at, uptime_seconds FROM machines WHERE id = 'web-01'"
            ).fetchone()
            return row[0], row[1]


@pytest.fixture
def view(any_store: AnyStore) -> Iterator[View]:
    v = View(any_store)
    yield v
    v.cache.close()


def test_a_heartbeat_writes_nothing_until_its_batch_on_both_backends(view: View) -> None:
    view.warm()
    before = view.last_seen()
    answer = view.heartbeat(uptime_seconds=70)
    assert answer is not None and answer["poll_hint"] == 60
    assert view.cache.heartbeats == 1
    assert view.last_seen() == before
    view.cache.flush()
    seen, uptime = view.last_seen()
    assert seen > before[0] and uptime == 70


def test_a_commit_reaches_the_next_report_before_the_view_caught_up(view: View) -> None:
    view.warm()
    assert view.heartbeat() is not None
    with view.store.transaction() as conn:
        machines.set_desired(conn, "web-01", GEN2, None, None, utcnow())
    assert view.heartbeat() is None  # the transaction answers it
    view.cache.catch_up()
    answer = view.heartbeat()
    assert answer is not None and answer["desired_generation"] == GEN2
    with view.store.transaction() as conn:
        credentials.revoke_token(conn, "web-01")
    assert view.cache.token_machine(view.tokens["web-01"]) is None
    view.cache.catch_up()
    assert view.cache.token_machine(view.tokens["web-01"]) is None
    with view.store.transaction() as conn:
        machines.set_lifecycle(conn, "web-02", Lifecycle.DECOMMISSIONED)
    assert view.heartbeat("web-02") is None
    view.cache.catch_up()
    assert view.heartbeat("web-02") is None


def test_a_change_to_one_machine_leaves_the_others_answered_from_memory_on_both_backends(
    view: View,
) -> None:
    view.warm()
    with view.store.transaction() as conn:
        machines.set_lifecycle(conn, "web-01", Lifecycle.DECOMMISSIONED)
    assert view.heartbeat("web-01") is None
    assert view.heartbeat("web-02") is not None


# --- two PostgreSQL replicas -----------------------------------------------------------


@pytest.fixture
def replicas(postgres_url: str) -> Iterator[View]:
    """A view of one PgStore, written through another on the same database."""
    from nixfleet.store.pg import PgStore

    here, there = PgStore(postgres_url, max_size=4), PgStore(postgres_url, max_size=4)
    v = View(here, writer=there)
    v.warm()
    v.cache.start()
    yield v
    v.cache.close()
    here.close()
    there.close()


def within_a_second(what: str, condition: Any) -> None:
    began = time.monotonic()
    wait_until(what, condition, timeout=10, interval=0.01)
    assert time.monotonic() - began < 1.0, what


def test_another_replicas_change_reaches_the_view_within_a_second(replicas: View) -> None:
    view = replicas
    wait_until("answered from memory", view.heartbeat)
    with view.writer.transaction() as conn:
        credentials.revoke_token(conn, "web-01")
    within_a_second("the token refused", lambda: view.heartbeat() is None)
    assert view.heartbeat("web-02") is not None  # the other machine still from memory
    within_a_second(
        "the view caught up",
        lambda: (
            view.cache.token_machine(view.tokens["web-01"]) is None
            and view.heartbeat("web-02") is not None
        ),
    )
    with view.writer.transaction() as conn:
        machines.set_desired(conn, "web-02", GEN2, None, None, utcnow())
    within_a_second(
        "the new desired generation",
        lambda: (view.heartbeat("web-02") or {}).get("desired_generation") == GEN2,
    )
    with view.writer.transaction() as conn:
        machines.set_lifecycle(conn, "web-02", Lifecycle.DECOMMISSIONED)
    within_a_second("the fast path stopped", lambda: view.heartbeat("web-02") is None)
    time.sleep(0.2)  # caught up since: still not answered from memory
    assert view.heartbeat("web-02") is None


def test_without_its_listener_the_view_answers_nothing_until_it_is_back(
    replicas: View, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    from nixfleet.store import pg_notify

    view = replicas
    wait_until("answered from memory", view.heartbeat)
    monkeypatch.setattr(pg_notify, "RECONNECT_AFTER", 3.0)  # time to look while it is away
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
            "application_name = 'nixfleet-listen' AND datname = current_database()"
        )
        wait_until("the listener cut off", lambda: view.store.published_changes() is None)
        # Not told of this change, it answers nothing from memory (not even web-02),
        # instead of answering web-01 as before it.
        with view.writer.transaction() as conn:
            credentials.revoke_token(conn, "web-01")
        assert view.store.published_changes() is None
        assert view.heartbeat("web-02") is None
        assert view.cache.token_machine(view.tokens["web-01"]) is None
    wait_until("the view back", lambda: view.heartbeat("web-02"))
    assert view.cache.token_machine(view.tokens["web-01"]) is None
