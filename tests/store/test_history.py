"""Machine history on both backends (`any_store`): changes are events, heartbeats are
nothing; each stored form is held to its SQL forms (SQLite's and PostgreSQL's)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from conftest import sql_writers

from nixfleet.controlplane.background import prune_history
from nixfleet.history import Event, EventKind
from nixfleet.models import HealthCheckResult, HealthResult, Lifecycle, Report, isoformat
from nixfleet.settings import Settings
from nixfleet.store import event_forms, history, machines
from nixfleet.store.conn import AnyStore, Connection, is_postgresql

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def gen(n: int) -> str:
    return f"/nix/store/{str(n) * 32}-nixos-system-web-03-v{n}"


def health(*failing: str) -> HealthResult:
    names = ("nginx", "disk", "ping")
    return HealthResult(
        all_passed=not failing,
        results=tuple(HealthCheckResult(n, "systemd", n not in failing, 3) for n in names),
    )


class Fleet:
    """A machine reporting through the real store, one transaction per report."""

    def __init__(self, store: AnyStore, machine: str = "web-03") -> None:
        self.store, self.id, self.t = store, machine, T0
        with store.transaction() as conn:
            machines.register(conn, machine, ["prod"], Lifecycle.PENDING, T0)

    def tick(self, seconds: int = 60) -> datetime:
        self.t += timedelta(seconds=seconds)
        return self.t

    def report(self, current: str, **kw: object) -> None:
        kw.setdefault("health", health())
        kw.setdefault("tags", ("web",))
        r = Report(machine_id=self.id, received_at=self.tick(), current_generation=current, **kw)  # type: ignore[arg-type]
        with self.store.transaction() as conn:
            machines.record_report(conn, r)

    def desire(self, current: str | None, source: str = "operator") -> None:
        with self.store.transaction() as conn:
            machines.set_desired(conn, self.id, current, None, source, self.tick())

    def events(self) -> list[tuple[str, str, str | None, str | None]]:
        with self.store.read() as conn:
            found = history.page(conn, self.id, limit=1000).events
            assert found == history.latest(conn, self.id, 1000)
        return [(e.kind.value, e.source, e.previous, e.generation) for e in found]


def test_heartbeats_append_nothing(any_store: AnyStore) -> None:
    store = any_store
    f = Fleet(store)
    f.report(gen(0))
    before = f.events()
    for i in range(200):
        # Durations, messages and uptime change on every poll: still heartbeats.
        f.report(gen(0), message=f"running {i}", uptime_seconds=i)
    assert f.events() == before
    assert before == [
        ("lifecycle", "agent", None, None),
        ("generation", "agent", None, gen(0)),
        ("tags", "agent", None, None),
    ]


def test_the_story_of_a_machine_and_nothing_else(any_store: AnyStore) -> None:
    store = any_store
    """v1 -> v2 (fails, rolled back) -> v3, a health flap, tags, lifecycle; heartbeats between."""
    f = Fleet(store)

    def idle(current: str, n: int = 100, **kw: object) -> None:
        for _ in range(n):
            f.report(current, **kw)

    f.report(gen(0))
    idle(gen(0))
    f.desire(gen(1), "rollout:r1")
    idle(gen(0), 3)  # fetching: still the old one
    f.report(gen(1))
    idle(gen(1))
    f.desire(gen(2), "rollout:r2")
    failed = dict(success=False, attempted_generation=gen(2), message="rolled back: nginx failed")
    f.report(gen(1), **failed)
    idle(gen(1), 100, **failed)  # the agent repeats the failure until desired changes
    f.desire(gen(3), "rollout:r3")
    f.report(gen(3))
    idle(gen(3))
    f.report(gen(3), health=health("nginx"))
    idle(gen(3), 50, health=health("nginx"))
    f.report(gen(3), health=health("nginx", "disk"))
    f.report(gen(3))
    idle(gen(3))
    f.report(gen(3), tags=("web", "eu"))
    idle(gen(3), 100, tags=("web", "eu"))
    with store.transaction() as conn:
        machines.set_lifecycle(conn, f.id, Lifecycle.MAINTENANCE, "key:ops", f.tick())
    idle(gen(3), 100, tags=("web", "eu"))
    assert f.events() == [
        ("lifecycle", "agent", None, None),
        ("generation", "agent", None, gen(0)),
        ("tags", "agent", None, None),
        ("desired", "rollout:r1", None, gen(1)),
        ("generation", "agent", gen(0), gen(1)),
        ("desired", "rollout:r2", gen(1), gen(2)),
        ("rolled-back", "agent", None, gen(2)),
        ("desired", "rollout:r3", gen(2), gen(3)),
        ("generation", "agent", gen(1), gen(3)),
        ("health", "agent", None, None),
        ("health", "agent", None, None),
        ("health", "agent", None, None),
        ("tags", "agent", None, None),
        ("lifecycle", "key:ops", None, None),
    ]
    with store.read() as conn:
        got = history.page(conn, f.id, kinds=[EventKind.HEALTH, EventKind.ROLLED_BACK]).events
    assert [dict(e.detail) for e in got] == [
        {"reason": "rolled back: nginx failed"},
        {
            "status": "failing",
            "previous": "healthy",
            "failing": ["nginx"],
            "newly_failing": ["nginx"],
            "recovered": [],
        },
        {
            "status": "failing",
            "previous": "failing",
            "failing": ["disk", "nginx"],
            "newly_failing": ["disk"],
            "recovered": [],
        },
        {
            "status": "healthy",
            "previous": "failing",
            "failing": [],
            "newly_failing": [],
            "recovered": ["disk", "nginx"],
        },
    ]
    with store.read() as conn:
        tags = [e.detail for e in history.page(conn, f.id, kinds=[EventKind.TAGS]).events]
        life = [e.detail for e in history.page(conn, f.id, kinds=[EventKind.LIFECYCLE]).events]
    assert tags[-1] == {"tag_source": "agent", "added": ["eu"], "removed": []}
    assert life == [
        {"from": "pending", "to": "active", "reason": "first agent report"},
        {"from": "active", "to": "maintenance"},
    ]


def test_a_new_failure_is_an_event_and_its_repeats_are_not(any_store: AnyStore) -> None:
    store = any_store
    f = Fleet(store)
    f.report(gen(0))
    f.desire(gen(2))
    for _ in range(3):
        f.report(gen(0), success=False, attempted_generation=gen(2), message="fetch failed")
    f.desire(gen(4))
    for _ in range(3):
        f.report(gen(0), success=False, attempted_generation=gen(4), message="fetch failed")
    failures = [e for e in f.events() if e[0] == "deployment-failed"]
    assert failures == [
        ("deployment-failed", "agent", None, gen(2)),
        ("deployment-failed", "agent", None, gen(4)),
    ]


def test_paging_and_time_windows(any_store: AnyStore) -> None:
    store = any_store
    f = Fleet(store)
    for i in range(25):
        f.report(gen(i % 10))
    with store.read() as conn:
        first = history.page(conn, f.id, kinds=[EventKind.GENERATION], limit=10)
        second = history.page(conn, f.id, kinds=[EventKind.GENERATION], after=first.next_after or 0)
        everything = [e.at for e in history.page(conn, f.id, limit=100).events]
        middle = history.page(conn, f.id, since=everything[5], until=everything[8]).events
    assert len(first.events) == 10 and first.next_after == first.events[-1].id
    assert len(second.events) == 15 and second.next_after is None
    assert [e.at for e in middle] == everything[5:8]
    # previous is the generation before, even across a page boundary
    assert second.events[0].previous == first.events[-1].generation


def test_pruning_by_age_and_cap_keeps_the_newest(any_store: AnyStore) -> None:
    store = any_store
    old = Fleet(store, "old-01")
    old.t = datetime.now(UTC) - timedelta(days=100)
    for i in range(30):
        old.report(gen(i % 10))  # 30 generation events, 100 days ago
    busy = Fleet(store, "busy-01")
    busy.t = datetime.now(UTC) - timedelta(days=1)
    for i in range(40):
        busy.report(gen(i % 10))
    with store.read() as conn:
        assert history.count(conn, "old-01") == 32
        newest = [e.id for e in history.latest(conn, "busy-01", 25)]
    settings = Settings(history_days=3650, history_max_events=25)
    assert prune_history(settings, store, machines=1) == 7 + 17
    with store.read() as conn:
        assert [e.id for e in history.latest(conn, "busy-01", 100)] == newest
        assert history.count(conn, "old-01") == 25
    recent = Settings(history_days=30, history_max_events=1000)
    assert prune_history(recent, store, machines=5) == 25
    with store.read() as conn:
        assert history.count(conn, "old-01") == 0 and history.count(conn, "busy-01") == 25


def test_lifecycle_to_its_own_state_writes_nothing(any_store: AnyStore) -> None:
    store = any_store
    f = Fleet(store)
    f.report(gen(0))
    before = f.events()
    with store.transaction() as conn:
        assert machines.set_lifecycle(conn, f.id, Lifecycle.ACTIVE) is Lifecycle.ACTIVE
    assert f.events() == before


def test_reboot_needed_and_rebooted(any_store: AnyStore) -> None:
    store = any_store
    """DESIGN §3 History: reboot needed (once per need), reboot done (booted changed)."""
    f = Fleet(store)
    f.report(gen(1), booted_generation=gen(1), needs_reboot=False)  # the first booted: no event
    f.report(gen(2), booted_generation=gen(1), needs_reboot=True)  # switched to a new kernel
    f.report(gen(2), booted_generation=gen(1), needs_reboot=True)  # the same need: heartbeat
    f.report(gen(2), booted_generation=gen(2), needs_reboot=False)  # back from the reboot
    f.report(gen(2), needs_reboot=False)  # an agent that omits it changes nothing
    with store.read() as conn:
        got = [
            (e.kind.value, e.generation, e.previous, dict(e.detail))
            for e in history.page(
                conn, f.id, kinds=[EventKind.REBOOT_NEEDED, EventKind.REBOOTED]
            ).events
        ]
    assert got == [
        ("reboot-needed", gen(2), None, {"booted": gen(1)}),
        ("rebooted", gen(2), None, {"previous": gen(1)}),
    ]


@pytest.mark.parametrize("kinds", [[EventKind.DESIRED], [EventKind.DESIRED, EventKind.TAGS]])
def test_desired_events_of_set_and_clear(any_store: AnyStore, kinds: list[EventKind]) -> None:
    store = any_store
    f = Fleet(store)
    f.desire(gen(1), "rollout:a")
    f.desire(gen(1), "rollout:a")  # unchanged: no event
    with store.transaction() as conn:
        machines.set_desired(conn, f.id, None, None, None, f.tick())
        machines.set_desired(conn, f.id, None, None, None, f.tick())  # unchanged again
        machines.set_desired(conn, f.id, gen(2), None, "operator", f.tick(), actor="key:ops")
        got = history.page(conn, f.id, kinds=kinds).events
    assert [(e.source, e.previous, e.generation) for e in got] == [
        ("rollout:a", None, gen(1)),
        ("operator", gen(1), None),
        ("key:ops", None, gen(2)),
    ]


# The writers of machines.desired_generation, each of which writes the desired events
# of the rows it changes (store.history.add_desired): a new writer must join them.
DESIRED_WRITERS = {
    ("nixfleet/store/machines.py", "set_desired"),
    ("nixfleet/store/ticks.py", "write_desired"),
    ("nixfleet/store/ticks.py", "revert"),
}


def test_every_writer_of_desired_writes_its_events() -> None:
    writers = sql_writers(r"UPDATE machines SET\b.*\bdesired_generation\s*=")
    assert set(writers) == DESIRED_WRITERS
    for (path, name), calls in writers.items():
        assert "history.add_desired" in calls, f"{path}:{name} writes no desired event"


# --- the stored forms (store.history's module docstring) ------------------------------

PATHS = [
    gen(1),
    "/nix/store/" + "a" * 32 + "-nixos-system-web-01-nixos-system-x-24.11",
    "/nix/store/" + "a" * 32 + "-nixos-system-web-03-nixos-system-web-03-24.11",
    "/nix/store/" + "a" * 32 + "-nixos-system-web-033-24.11",  # another name
    "/nix/store/" + "b" * 32 + "-hello-2.12",
    "/nix/store/" + "c" * 32 + "-odd\x01name",  # kept as it is: a mark is in it
    "/nix/store/" + "c" * 32 + "-nixos-system-web-03-odd\x02name",
    "/nix/store//weird",
    "/nix/store/",
    "/elsewhere/x",
]


@pytest.mark.parametrize("machine", ["web-03", "web-03.example.org", "web"])
@pytest.mark.parametrize("path", PATHS)
def test_store_paths_encode_the_same_in_python_and_sql(
    any_store: AnyStore, path: str, machine: str
) -> None:
    encoded = event_forms.encode_path(path, machine)
    assert event_forms.decode_path(encoded, machine) == path
    assert not encoded.startswith("/") or encoded == path
    with any_store.read() as conn:
        sql = event_forms.encode_path_sql("p", "m", postgresql=is_postgresql(conn))
        got = conn.execute(
            f"SELECT {sql} FROM (SELECT CAST(? AS TEXT) AS p, CAST(? AS TEXT) AS m) x",
            (path, machine),
        ).fetchone()[0]
    assert got == encoded


def test_a_system_path_is_stored_without_its_machines_name() -> None:
    assert event_forms.encode_path(gen(1), "web-03.example.org") == "1" * 32 + "\x02v1"
    assert event_forms.encode_path(gen(1), "db-01") == "1" * 32 + "\x01web-03-v1"


@pytest.mark.parametrize(
    "at",
    [
        T0,
        T0 + timedelta(microseconds=1),
        datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2038, 1, 19, 3, 14, 8, 123_456, tzinfo=UTC),
    ],
)
def test_times_are_microseconds_in_python_and_sql(any_store: AnyStore, at: datetime) -> None:
    us = event_forms.micros(at)
    assert event_forms.from_micros(us) == at
    with any_store.read() as conn:
        sql = event_forms.micros_sql("t", postgresql=is_postgresql(conn))
        got = conn.execute(f"SELECT {sql} FROM (SELECT CAST(? AS TEXT) AS t) x", (isoformat(at),))
        assert got.fetchone()[0] == us


# A machine's stored generations, (seq, path or k) in seq order, whatever the backend.
def _stored(conn: Connection, machine_id: str) -> list[tuple[int, object]]:
    back = "generation_back" if is_postgresql(conn) else "NULL"
    rows = conn.execute(
        f"SELECT seq, generation, {back} AS back FROM machine_events WHERE machine = "
        "(SELECT num FROM machine_numbers WHERE machine_id = ?) ORDER BY seq",
        (machine_id,),
    )
    return [(r[0], r[1] if r[2] is None else r[2]) for r in rows]


def test_a_switch_refers_to_its_desired_event_and_keeps_its_path_when_pruned(
    any_store: AnyStore,
) -> None:
    store = any_store
    f = Fleet(store)
    f.report(gen(0))
    f.desire(gen(1), "rollout:r1")
    f.report(gen(1))
    for i in range(3):
        f.report(gen(1), health=health("nginx") if i % 2 == 0 else health())
    with store.read() as conn:
        stored = _stored(conn, f.id)
    # lifecycle, generation (its own path), tags, desired (its path), generation: "1 back"
    assert [type(g).__name__ for _, g in stored[:5]] == [
        "NoneType",
        "str",
        "NoneType",
        "str",
        "int",
    ]
    assert stored[4][1] == 1
    before = f.events()
    settings = Settings(history_days=3650, history_max_events=len(stored) - 4)
    assert prune_history(settings, store, machines=10) == 4  # the desired event went
    # the same events but the first, whose previous went with the events before it
    assert f.events()[1:] == before[5:]
    assert f.events()[0] == ("generation", "agent", None, gen(1))
    with store.read() as conn:  # the reference's holder went: the path was written back
        assert type(_stored(conn, f.id)[0][1]) is str


def test_machine_history_view_reads_as_page_does(any_store: AnyStore) -> None:
    store = any_store
    f = Fleet(store)
    f.report(gen(0))
    f.desire(gen(1), "rollout:r1")
    f.report(gen(1), health=health("disk"))
    f.report(gen(1), success=False, attempted_generation=gen(2), message="fetch failed")
    with store.transaction() as conn:
        machines.set_lifecycle(conn, f.id, Lifecycle.MAINTENANCE, "key:ops", f.tick())
    with store.read() as conn:
        events = history.page(conn, f.id).events
        view = conn.execute(
            "SELECT seq, at, kind, source, generation, detail FROM machine_history "
            "WHERE machine_id = ? ORDER BY seq",
            (f.id,),
        ).fetchall()
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in view] == [
        (e.id, isoformat(e.at), e.kind.value, e.source, e.generation) for e in events
    ]
    assert [event_forms.decode_detail(e.kind, r[5]) for e, r in zip(events, view, strict=True)] == [
        dict(e.detail) for e in events
    ]


@pytest.mark.parametrize(
    ("kind", "detail", "compact"),
    [
        (EventKind.TAGS, {"tag_source": "agent", "added": ["eu"], "removed": []}, True),
        (EventKind.LIFECYCLE, {"from": "active", "to": "maintenance"}, True),
        (EventKind.LIFECYCLE, {"to": "maintenance", "from": "active"}, False),  # other order
        (EventKind.HEALTH, {"status": "failing", "extra": 1}, False),
        (EventKind.GENERATION, {"anything": True}, False),
    ],
)
def test_details_are_stored_compactly_and_read_back_unchanged(
    kind: EventKind, detail: dict[str, object], compact: bool
) -> None:
    stored = event_forms.encode_detail(kind, detail)
    assert stored is not None and stored.startswith("[") is compact
    back = event_forms.decode_detail(kind, stored)
    assert back == detail and list(back) == list(detail)


def test_events_written_with_the_reports_window_are_stored_as_without_it(
    any_store: AnyStore,
) -> None:
    """record_report hands history.add the number and window its row read
    (NUMBER_SQL, WINDOW_SQL); the rows must be those add writes reading them itself.
    On PostgreSQL the row is read before its lock, so add takes only the number and
    reads the window again: an empty one given changes nothing."""
    store = any_store
    a, b = Fleet(store, "web-a"), Fleet(store, "web-b")
    for f in (a, b):
        f.report(gen(0))
        f.desire(gen(1))
        f.report(gen(1), health=health("nginx"))
    at = a.tick()
    with store.transaction() as conn:
        for machine, known in (("web-a", False), ("web-b", True)):
            events = [
                Event(machine, at, EventKind.GENERATION, "agent", gen(1)),
                Event(machine, at, EventKind.DESIRED, "rollout:r9", gen(0)),
                Event(machine, at, EventKind.GENERATION, "agent", gen(0)),
            ]
            window = None
            if known:
                pg = is_postgresql(conn)
                window_sql = "NULL" if pg else history.WINDOW_SQL.format(machine_id="?")
                row = conn.execute(
                    f"SELECT {history.NUMBER_SQL.format(machine_id='?')}, {window_sql}",
                    (machine,) if pg else (machine, machine),
                ).fetchone()
                window = {machine: (int(row[0]), history.window_of(row[1]))}
            history.add(conn, events, window)
        back = "generation_back" if is_postgresql(conn) else "NULL"
        stored = {
            m: conn.execute(
                f"SELECT seq, at, kind, source, generation, {back} AS back, detail "
                "FROM machine_events WHERE machine = "
                "(SELECT num FROM machine_numbers WHERE machine_id = ?) ORDER BY seq",
                (m,),
            ).fetchall()
            for m in ("web-a", "web-b")
        }
        refs = [g for _, g in _stored(conn, "web-b")[-3:]]
    assert [tuple(r) for r in stored["web-a"]] == [tuple(r) for r in stored["web-b"]]
    assert any(type(g) is int for g in refs)  # references
