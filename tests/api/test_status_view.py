"""The whole fleet's status kept in memory (api.status_view) is the database's own
document (store.status.status_document), entry by entry and count by count, after
every kind of write through the real API and store, on both backends, with new
machines sorted in, time making machines stale, and writes beside the Store."""

from __future__ import annotations

import io
import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import falcon.testing
import pytest

from nixfleet import reconciler
from nixfleet.api import create_app
from nixfleet.api.status_view import Pieces, StatusView
from nixfleet.filters import MachineFilter
from nixfleet.models import Sync, utcnow
from nixfleet.settings import Settings
from nixfleet.store import Store, credentials, machines, report_cache, status
from nixfleet.store.conn import AnyStore

STALE_AFTER = 300
OLD = "/nix/store/" + "o" * 32 + "-nixos-system-web-01"
NEW = "/nix/store/" + "n" * 32 + "-nixos-system-web-01"


class Fleet:
    def __init__(self, store: AnyStore, admin_key: str) -> None:
        self.store = store
        self.view = StatusView(store)
        self.client = falcon.testing.TestClient(
            create_app(Settings(stale_after=STALE_AFTER), store)
        )
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.tokens: dict[str, str] = {}

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else self.admin
        r = self.client.simulate_request(method, path, json=body, headers=headers)
        assert r.status_code < 300, r.text
        return r.json

    def register(self, host: str, tags: list[str]) -> None:
        body = {"id": host, "tags": tags, "issue_token": True}
        self.tokens[host] = self.call("POST", "/api/v1/machines", body)["token"]

    def report(self, host: str, **body: Any) -> None:
        self.call("POST", f"/api/v1/machines/{host}/report", body, token=self.tokens[host])

    def same(self, now: datetime | None = None) -> tuple[list[dict[str, Any]], status.Counts]:
        """The view's document is the database's, at `now`; returns the entries."""
        now = now or utcnow()
        kept = self.view.document(now, STALE_AFTER)
        assert kept is not None
        heads, tails, counts = kept
        items = [piece for pair in zip(heads, tails, strict=True) for piece in pair]
        with self.store.read() as conn:
            doc = status.status_document(conn, MachineFilter(), now, STALE_AFTER)
        entries = json.loads(b"[" + b"".join(items) + b"]")
        assert entries == json.loads(b"[" + doc.machines_json + b"]")
        assert [list(e) for e in entries] == [list(status.STATUS_SQL)] * len(entries)
        assert counts == doc.counts
        return entries, counts


@pytest.fixture
def fleet(store: AnyStore, admin_key: str) -> Fleet:
    return Fleet(store, admin_key)


def test_every_write_reaches_the_next_document_without_a_reload(fleet: Fleet) -> None:
    assert fleet.same()[0] == []
    fleet.register("web-02", ["web"])
    fleet.register("web-01", [])  # no tags: nothing but its registration names it
    fleet.same()
    assert fleet.view.reloads == 1
    fleet.report("web-01", current_generation=OLD, success=True, message="running")
    fleet.same()
    # A heartbeat's batch (api.report_cache's flush) moves only the time.
    with fleet.store.transaction() as conn:
        report_cache.write_last_seen(conn, [("web-02", "2099-01-01T00:00:00.000000Z", 5)])
    entries, _ = fleet.same()
    assert entries[1]["last_report_at"] == "2099-01-01T00:00:00.000000Z"
    with fleet.store.transaction() as conn:
        machines.set_desired(conn, "web-01", NEW, None, "operator", utcnow())
    assert fleet.same()[0][0]["sync"] == "updating"
    for host in ("a-first", "web-015", "zz-last"):  # sorted in, not appended
        fleet.register(host, ["new"])
    entries, _ = fleet.same()
    assert [e["id"] for e in entries] == ["a-first", "web-01", "web-015", "web-02", "zz-last"]
    fleet.call("POST", "/api/v1/machines/web-02/tags", {"tags": ["canary"]})
    fleet.call("PATCH", "/api/v1/machines/web-02/lifecycle", {"lifecycle": "active"})
    fleet.same()
    fleet.report(
        "web-01",
        current_generation=OLD,
        success=False,
        attempted_generation=NEW,
        message="rolled back: nginx failed",
        health={"all_passed": False, "results": []},
    )
    entries, counts = fleet.same()
    assert entries[1]["sync"] == "failed" and entries[1]["health_status"] == "failing"
    assert counts.by_sync[Sync.FAILED] == 1
    fleet.call("PATCH", "/api/v1/machines/web-02/lifecycle", {"lifecycle": "decommissioned"})
    _, counts = fleet.same()
    assert counts.selected == 5 and counts.counted == 4
    assert fleet.view.reloads == 1


def test_time_alone_makes_machines_stale(fleet: Fleet) -> None:
    for host in ("web-01", "web-02", "web-03"):
        fleet.register(host, [])
    fleet.report("web-01", current_generation=OLD, success=True)
    fleet.report("web-03", current_generation=OLD, success=True)
    fleet.call("PATCH", "/api/v1/machines/web-03/lifecycle", {"lifecycle": "decommissioned"})
    _, counts = fleet.same()
    assert counts.stale == 0
    entries, counts = fleet.same(utcnow() + timedelta(seconds=STALE_AFTER + 5))
    # Never reported: never stale; decommissioned: never stale.
    assert [e["stale"] for e in entries] == [True, False, False]
    assert counts.stale == 1


def test_a_rollouts_desired_generations_reach_the_document(fleet: Fleet) -> None:
    hosts = [f"web-{i:02}" for i in range(6)]
    for host in hosts:
        fleet.register(host, ["web"])
        fleet.report(host, current_generation=OLD, success=True)
    fleet.same()
    entries = [{"hostname": h, "store_path": NEW, "platform": "x86_64-linux"} for h in hosts]
    release = fleet.call("POST", "/api/v1/releases", {"entries": entries})["id"]
    rollout = {
        "version": 1,
        "name": "web-new",
        "release": release,
        "target": {"tags": ["web"]},
        "strategy": "all-at-once",
    }
    fleet.call("POST", "/api/v1/rollouts", rollout)
    fleet.same()
    reconciler.tick(fleet.store, hint=5)  # writes desired generations, set-based
    entries_now, counts = fleet.same()
    assert {e["desired_generation"] for e in entries_now} == {NEW}
    assert counts.by_sync[Sync.UPDATING] == len(hosts)


def test_the_served_document_is_the_view_and_a_filter_is_the_databases(fleet: Fleet) -> None:
    for host in ("web-01", "web-02"):
        fleet.register(host, ["web"])
    whole = fleet.call("GET", "/api/v1/status")
    backwards = fleet.call("GET", "/api/v1/status?dir=desc")  # written by SQL
    assert whole["machines"] == backwards["machines"][::-1]
    assert whole["summary"] == backwards["summary"]
    assert whole["summary"]["total"] == 2


def test_pruned_changes_reload_everything(fleet: Fleet) -> None:
    fleet.register("web-01", [])
    fleet.same()
    fleet.register("web-02", [])
    with fleet.store.transaction() as conn:
        report_cache.prune(conn, keep=1)
    fleet.report("web-01", current_generation=OLD, success=True)
    fleet.same()
    assert fleet.view.reloads == 2


def test_writes_beside_the_store_are_noticed_or_quoted(tmp_path: Path) -> None:
    sqlite_store = Store(tmp_path / "own.db")
    with sqlite_store.transaction() as conn:
        admin_key = credentials.create_key(conn, "admin", "admin", "test", utcnow())
    fleet = Fleet(sqlite_store, admin_key)
    for host in ("web-01", "web-02", "web-03"):
        fleet.register(host, [])
    fleet.same()
    shell = sqlite3.connect(sqlite_store.path)  # what an operator's sqlite3 shell does
    with shell:
        shell.execute("DELETE FROM machines WHERE id = 'web-02'")
    entries, _ = fleet.same()
    assert [e["id"] for e in entries] == ["web-01", "web-03"]
    assert fleet.view.reloads == 2  # one machine fewer than the view held
    with shell:  # a time no Store writes, with a quote and a backslash in it
        shell.execute("UPDATE machines SET last_report_at = 'x\"\\y' WHERE id = 'web-03'")
    entries, _ = fleet.same()
    assert entries[1]["last_report_at"] == 'x"\\y'
    with shell:  # an id that splits the times' string: the database writes the document
        shell.execute(
            "INSERT INTO machines (id, lifecycle, registered_at) "
            "VALUES ('bad' || char(10) || 'id', 'active', '2026-12-01T00:00:00.000000Z')"
        )
    assert fleet.view.document(utcnow(), STALE_AFTER) is None
    served = fleet.call("GET", "/api/v1/status")
    assert [m["id"] for m in served["machines"]] == ["bad\nid", "web-01", "web-03"]
    shell.close()
    sqlite_store.close()


@pytest.mark.parametrize("send", [1, 7, 16_384, 3_000_000])
def test_waitress_sends_pieces_as_their_join(send: int) -> None:
    """waitress's own file_wrapper reads the body as a server channel does: peek a
    range, send part of it, skip what was sent (sends of every size, partial ones)."""
    from waitress.buffers import ReadOnlyFileBasedBuffer

    pieces = [bytes([65 + i % 26]) * (i % 50) for i in range(4_000)]
    whole = b"".join(pieces)  # ~100 KB, in chunks of ~1.5 KB
    buffer = ReadOnlyFileBasedBuffer(Pieces(pieces, len(whole), chunk=64))
    assert buffer.prepare() == len(whole)
    out = bytearray()
    while buffer.remain:
        chunk = buffer.get(send)
        sent = max(1, len(chunk) * 2 // 3)  # a socket takes part of what it is given
        out += chunk[:sent]
        buffer.skip(sent, True)
    assert bytes(out) == whole


def test_pieces_refuse_to_go_back_and_a_short_body() -> None:
    body = Pieces([b"abc"] * 5000, 15_000, chunk=100)
    assert body.read(4) == b"abca"
    assert body.seek(0) == 0  # back to the start of the last read: a peek
    assert body.read(400) == b"abc" * 133 + b"a"
    assert body.read(400) == b"bc" + b"abc" * 132 + b"ab"  # a new chunk, from 400
    with pytest.raises(io.UnsupportedOperation):
        body.seek(0)  # behind the chunk it holds: sent already
    assert body.seek(0, io.SEEK_END) == 15_000
    short = Pieces([b"ab"], 3)
    with pytest.raises(ValueError, match="shorter"):
        short.read()


def test_preloading_leaves_the_first_request_nothing_to_load(fleet: Fleet) -> None:
    fleet.register("web-01", [])
    fleet.view.preload()  # what the server's start does, in a thread of its own
    fleet.view.preload()  # loaded once
    assert fleet.view.reloads == 1
    fleet.same()
    assert fleet.view.reloads == 1


def test_another_process_writes_reach_the_view(tmp_path: Path) -> None:
    """A worker's view, another worker's writes: two stores on one file."""
    path = tmp_path / "fleet.db"
    writer = Store(path)
    with writer.transaction() as conn:
        admin_key = credentials.create_key(conn, "admin", "admin", "test", utcnow())
    fleet = Fleet(writer, admin_key)
    reader = Store(path)
    fleet.view = StatusView(reader)
    fleet.register("web-02", [])
    fleet.same()
    fleet.register("web-01", ["web"])
    fleet.report("web-02", current_generation=OLD, success=True, message="running")
    with writer.transaction() as conn:
        machines.set_desired(conn, "web-02", NEW, None, "operator", utcnow())
    entries, _ = fleet.same()
    assert [(e["id"], e["sync"]) for e in entries] == [
        ("web-01", "no desired"),
        ("web-02", "updating"),
    ]
    assert fleet.view.reloads == 1
    reader.close()
    writer.close()
