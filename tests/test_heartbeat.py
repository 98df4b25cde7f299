"""heartbeat.is_heartbeat held to store.machines.record_report, case by case.

Generated prior states (each made by storing a report for real) and next reports:
whenever the pure decision says "heartbeat", storing the report for real writes no
history event, no tag, and changes no column of the machine but last_report_at and
uptime_seconds. And the usual poll of a healthy machine is one.
"""

from __future__ import annotations

import random
import sqlite3
from typing import Any, cast

from nixfleet.heartbeat import health_key, is_heartbeat, system_state
from nixfleet.models import HealthResult, Lifecycle, Report, utcnow
from nixfleet.store import Store, machines
from nixfleet.store import report_cache as rc
from nixfleet.store.rows import stored_health_key
from nixfleet.wire import Health

A = "/nix/store/" + "a" * 32 + "-nixos-system-x"
B = "/nix/store/" + "b" * 32 + "-nixos-system-x"


def check(name: str, passed: bool, message: str = "", duration: int = 3) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "systemd",
        "passed": passed,
        "duration_ms": duration,
        "message": message,
    }


HEALTHS: list[dict[str, Any] | None] = [
    None,
    {"all_passed": True, "results": [check("nginx", True)]},
    {"all_passed": True, "results": [check("nginx", True, duration=9)]},  # durations only
    {"all_passed": True, "results": [check("nginx", True, "active")]},
    {"all_passed": False, "results": [check("nginx", False, "failed")]},
    {"all_passed": True, "results": [check("nginx", True), check("sshd", True)]},
]
CHOICES: dict[str, list[Any]] = {
    "current_generation": [A, B],
    "success": [True, False],
    "attempted_generation": [None, A, B],
    "message": ["running", "rolled back: health"],
    "health": HEALTHS,
    "tags": [None, ["prod"], ["prod", "web"]],
    "agent_version": [None, "0.1.0", "0.2.0"],
    "needs_reboot": [None, True, False],
    "booted_generation": [None, A],
    "output": [None, "switch failed", "switch failed again"],
    "uptime_seconds": [None, 5, 500],
}


def body(rng: random.Random) -> dict[str, Any]:
    doc = {k: rng.choice(v) for k, v in CHOICES.items()}
    return {k: v for k, v in doc.items() if v is not None or k == "current_generation"}


def store_report(conn: sqlite3.Connection, machine_id: str, doc: dict[str, Any]) -> None:
    health = doc.get("health")
    machines.record_report(
        conn,
        Report(
            machine_id=machine_id,
            received_at=utcnow(),
            current_generation=doc["current_generation"],
            success=doc.get("success", True),
            message=doc.get("message", ""),
            attempted_generation=doc.get("attempted_generation"),
            health=HealthResult.from_dict(health) if health is not None else None,
            tags=tuple(doc["tags"]) if doc.get("tags") is not None else None,
            agent_version=doc.get("agent_version"),
            uptime_seconds=doc.get("uptime_seconds"),
            output=doc.get("output"),
            needs_reboot=doc.get("needs_reboot"),
            booted_generation=doc.get("booted_generation"),
        ),
    )


def picture(conn: sqlite3.Connection, machine_id: str) -> tuple[Any, ...]:
    row = conn.execute("SELECT * FROM machines WHERE id = ?", (machine_id,)).fetchone()
    skip = ("last_report_at", "uptime_seconds")
    kept = {k: row[k] for k in row.keys() if k not in skip}  # noqa: SIM118 (a Row iterates values)
    kept["health_json"] = stored_health_key(row["health_json"])  # durations may differ
    tags = conn.execute(
        "SELECT tag, source FROM machine_tags WHERE machine_id = ? ORDER BY 1, 2", (machine_id,)
    ).fetchall()
    events = conn.execute(
        "SELECT count(*) FROM machine_history WHERE machine_id = ?", (machine_id,)
    ).fetchone()[0]
    return kept, [tuple(t) for t in tags], events


def test_a_report_judged_a_heartbeat_changes_nothing_but_last_seen(store: Store) -> None:
    rng = random.Random(17)
    judged = 0
    for n in range(800):
        machine_id = f"m-{n:04d}"
        with store.transaction() as conn:
            machines.register(conn, machine_id, [], Lifecycle.PENDING, utcnow())
            for _ in range(rng.choice([1, 1, 2])):  # the prior state: stored reports
                store_report(conn, machine_id, body(rng))
            if rng.random() < 0.1:
                machines.set_lifecycle(conn, machine_id, Lifecycle.MAINTENANCE)
        prior = body(rng)
        # Reports repeat the stored one (what agents mostly send), or change one field,
        # or are new.
        nxt = dict(prior) if rng.random() < 0.9 else body(rng)
        if rng.random() < 0.6:
            field = rng.choice(sorted(CHOICES))
            nxt[field] = rng.choice(CHOICES[field])
            if nxt[field] is None and field != "current_generation":
                del nxt[field]
        with store.transaction() as conn:
            store_report(conn, machine_id, prior)
        with store.read() as conn:
            (cached,), _ = rc.load_machines(conn, [machine_id])
            before = picture(conn, machine_id)
        verdict = is_heartbeat(cached.known, nxt)
        with store.transaction() as conn:
            store_report(conn, machine_id, nxt)
            after = picture(conn, machine_id)
        if verdict:
            judged += 1
            assert after == before, (prior, nxt)
    assert judged > 100  # the decision is not vacuously "no"


def test_the_usual_poll_of_a_healthy_machine_is_a_heartbeat(store: Store) -> None:
    doc = {
        "current_generation": A,
        "tags": ["prod", "web"],
        "success": True,
        "message": "running",
        "health": HEALTHS[1],
        "agent_version": "0.1.0",
        "uptime_seconds": 100,
    }
    with store.transaction() as conn:
        machines.register(conn, "web-01", ["region-eu"], Lifecycle.ACTIVE, utcnow())
        store_report(conn, "web-01", doc)
    with store.read() as conn:
        (cached,), missing = rc.load_machines(conn, ["web-01", "nope"])
    assert missing == ["nope"]
    assert is_heartbeat(cached.known, {**doc, "uptime_seconds": 160, "health": HEALTHS[2]})
    assert not is_heartbeat(cached.known, {**doc, "tags": ["prod"]})
    assert not is_heartbeat(cached.known, {**doc, "health": HEALTHS[4]})
    assert not is_heartbeat(cached.known, {**doc, "current_generation": B})


def test_named_cases_the_generated_ones_seldom_meet(store: Store) -> None:
    failed_here = {"current_generation": A, "success": False, "attempted_generation": A}
    cases = [
        # The failed generation is the one it runs: a report without the attempt clears it.
        (failed_here, {"current_generation": A, "success": False}),
        # Another switch output for the same failure is kept.
        (
            {**failed_here, "attempted_generation": B, "output": "one"},
            {**failed_here, "attempted_generation": B, "output": "two"},
        ),
    ]
    for n, (prior, nxt) in enumerate(cases):
        machine_id = f"case-{n}"
        with store.transaction() as conn:
            machines.register(conn, machine_id, [], Lifecycle.ACTIVE, utcnow())
            store_report(conn, machine_id, prior)
        with store.read() as conn:
            (cached,), _ = rc.load_machines(conn, [machine_id])
            before = picture(conn, machine_id)
        with store.transaction() as conn:
            store_report(conn, machine_id, nxt)
            assert picture(conn, machine_id) != before
        assert not is_heartbeat(cached.known, nxt)
    # A machine that reported, then was set back to provisioning (as no API does, but a
    # database might say): its next report promotes it, so it is no heartbeat.
    doc = {"current_generation": A}
    with store.transaction() as conn:
        machines.register(conn, "reset", [], Lifecycle.ACTIVE, utcnow())
        store_report(conn, "reset", doc)
        conn.execute("UPDATE machines SET lifecycle = 'provisioning' WHERE id = 'reset'")
    with store.read() as conn:
        (cached,), _ = rc.load_machines(conn, ["reset"])
    assert not is_heartbeat(cached.known, doc)


def test_system_state_is_the_reports() -> None:
    for success in (True, False):
        for health in HEALTHS:
            report = Report(
                "x",
                utcnow(),
                A,
                success=success,
                health=HealthResult.from_dict(cast(Health, health)) if health is not None else None,
            )
            assert system_state(success, health_key(health)) == report.system_state.value
