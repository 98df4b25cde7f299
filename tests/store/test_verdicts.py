"""The health gate in SQL (store.verdicts.JUDGE_SQL) agrees with rollout.judge, case by case,
on both backends (`any_store`: JUDGE_SQL and JUDGE_SQL_PG).

The reconciler judges a 100,000-machine batch in SQL; rollout.judge stays the
definition. Each case is written as MachineFacts, stored as the machine and
rollout_machines rows it stands for, judged both ways, and compared: which
machines change, and to what health, reason and soak clock.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nixfleet import rollout
from nixfleet.models import HealthResult, MachineHealth, health_of, isoformat, parse_time
from nixfleet.rollout import MachineFacts
from nixfleet.store import verdicts
from nixfleet.store.conn import AnyStore, Connection

# Microseconds on purpose: a time on the second is stored without a fraction
# ("…:00Z"), the trap for comparing the strings.
STARTED = datetime(2026, 11, 27, 10, 0, 0, 500000, tzinfo=UTC)
GEN = "/nix/store/" + "n" * 32 + "-nixos-system-new"
OLD = "/nix/store/" + "o" * 32 + "-nixos-system-old"
TIMEOUT, SOAK = 300, 60
P, H, U = MachineHealth.PENDING, MachineHealth.HEALTHY, MachineHealth.UNHEALTHY


def at(seconds: float) -> datetime:
    return STARTED + timedelta(seconds=seconds)


ON_THE_SECOND = datetime(2026, 11, 27, 10, 0, 1, tzinfo=UTC)  # 0.5 s after STARTED
BEFORE_ON_THE_SECOND = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)  # 0.5 s before


def good(**kw: Any) -> MachineFacts:
    base = MachineFacts("m", GEN, last_report_at=at(5), current_generation=GEN, last_success=True)
    return replace(base, **kw)


def failed(**kw: Any) -> MachineFacts:
    base = MachineFacts(
        "m",
        GEN,
        last_report_at=at(5),
        current_generation=OLD,
        last_success=False,
        failed_generation=GEN,
    )
    return replace(base, **kw)


CASES: list[tuple[str, MachineFacts, float, int]] = [
    (
        "fresh report still carrying the failure of the generation before",
        failed(failed_generation=OLD),
        10,
        SOAK,
    ),
    (
        "on the release's generation, still reporting another generation's failure",
        failed(current_generation=GEN, failed_generation=OLD),
        10,
        SOAK,
    ),
    # (name, facts, now in seconds after STARTED, soak)
    ("silent, before the timeout", MachineFacts("m", GEN), 10, SOAK),
    ("silent, at the timeout", MachineFacts("m", GEN), TIMEOUT, SOAK),
    ("report before the batch", good(last_report_at=at(-1)), 10, SOAK),
    ("report before the batch, timed out", good(last_report_at=at(-1)), TIMEOUT, SOAK),
    ("report 1 µs before the start", good(last_report_at=at(-0.000001)), 10, 0),
    ("report exactly at the start", good(last_report_at=STARTED), 10, 0),
    ("report on the second, after the start", good(last_report_at=ON_THE_SECOND), 10, 0),
    (
        "report on the second, before the start",
        good(last_report_at=BEFORE_ON_THE_SECOND),
        10,
        0,
    ),
    ("failure with a message", failed(last_message="rolled back: x.service"), 10, SOAK),
    ("failure without a message", failed(last_message=""), 10, SOAK),
    ("failure, message unknown", failed(), 10, SOAK),
    ("failed generation, success flag set", replace(failed(), last_success=True), 10, SOAK),
    (
        "other generation failed, success",
        replace(failed(), failed_generation=OLD, last_success=True),
        10,
        SOAK,
    ),
    ("success False only", replace(failed(), failed_generation=None), 10, SOAK),
    ("stale failure is silence", replace(failed(), last_report_at=at(-5)), 10, SOAK),
    ("failure while soaking", failed(healthy_since=at(3)), 10, SOAK),
    ("good, no soak", good(), 10, 0),
    ("good, soak starts", good(), 10, SOAK),
    ("good, soaking", good(healthy_since=at(6)), 30, SOAK),
    ("good, soak just short", good(healthy_since=at(6)), 65.999999, SOAK),
    ("good, soak exactly done", good(healthy_since=at(6)), 66, SOAK),
    ("soak clock on the second", good(healthy_since=ON_THE_SECOND), 60.5, SOAK),
    ("soak clock on the second, short", good(healthy_since=ON_THE_SECOND), 60.499999, SOAK),
    ("good, soaking past the timeout", good(healthy_since=at(TIMEOUT - 10)), TIMEOUT, SOAK),
    ("good without health result", good(health_passed=None), 10, 0),
    ("health checks failing", good(health_passed=False), 10, SOAK),
    ("health checks failing, timed out", good(health_passed=False), TIMEOUT, SOAK),
    ("health fails while soaking", good(health_passed=False, healthy_since=at(6)), 10, SOAK),
    (
        "health fails while soaking, timed out",
        good(health_passed=False, healthy_since=at(6)),
        TIMEOUT + 1,
        SOAK,
    ),
    ("old generation", good(current_generation=OLD), 10, SOAK),
    ("old generation, timed out", good(current_generation=OLD), TIMEOUT, SOAK),
    ("no generation at all, timed out", good(current_generation=None), TIMEOUT, SOAK),
    ("success unknown, right generation", good(last_success=None), 10, 0),
    # DESIGN §11: a machine given its generation after the batch started (a disruption
    # budget held it) counts its reports and its timeout from then.
    ("given later, reported before", good(given_at=at(10), last_report_at=at(5)), 20, 0),
    ("given later, reported after", good(given_at=at(10), last_report_at=at(11)), 20, 0),
    ("given later, silent, batch timed out", MachineFacts("m", GEN, given_at=at(100)), TIMEOUT, 0),
    (
        "given later, silent, own timeout",
        MachineFacts("m", GEN, given_at=at(100)),
        TIMEOUT + 100,
        0,
    ),
    ("given before the batch", good(given_at=at(-50)), 10, 0),
    # Without `reboot: when-needed` the reboot facts change nothing.
    ("needs a reboot, policy never", good(needs_reboot=True), 10, 0),
    ("rebooting, policy never", good(rebooting=True), 10, 0),
]

# (name, facts, now, soak) judged with `reboot: when-needed`.
REBOOT_CASES: list[tuple[str, MachineFacts, float, int]] = [
    ("needs a reboot", good(needs_reboot=True), 10, 0),
    ("needs a reboot, timed out", good(needs_reboot=True), TIMEOUT, 0),
    ("rebooting", good(rebooting=True, needs_reboot=True), 10, 0),
    ("rebooting, timed out", good(rebooting=True, needs_reboot=False), TIMEOUT, 0),
    ("rebooted, lease still held", good(rebooting=True, needs_reboot=False), 10, 0),
    ("rebooted and released", good(needs_reboot=False), 10, 0),
    ("never said (old agent)", good(needs_reboot=None), 10, 0),
    ("needs a reboot, soaking clock stops", good(needs_reboot=True, healthy_since=at(6)), 30, SOAK),
    ("needs a reboot but failed", failed(needs_reboot=True), 10, 0),
    ("needs a reboot, health failing", good(needs_reboot=True, health_passed=False), TIMEOUT, 0),
]


def _axis(f: MachineFacts) -> str:
    """The stored health axis of these facts, as record_report writes it."""
    return health_of(None if f.health_passed is None else HealthResult(f.health_passed)).value


def _store_case(store: AnyStore, i: int, f: MachineFacts) -> None:
    health = None if f.health_passed is None else json.dumps({"all_passed": f.health_passed})
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO machines (id, lifecycle, registered_at, current_generation, "
            "last_report_at, last_success, failed_generation, health_json, health, last_message, "
            "desired_set_at, needs_reboot) VALUES (?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                f"m{i}",
                isoformat(STARTED),
                f.current_generation,
                isoformat(f.last_report_at),
                None if f.last_success is None else int(f.last_success),
                f.failed_generation,
                health,
                _axis(f),
                f.last_message,
                isoformat(f.given_at),
                None if f.needs_reboot is None else int(f.needs_reboot),
            ),
        )
        if f.rebooting:
            conn.execute(
                "INSERT INTO reboot_leases VALUES ('default', ?, 'ro-1', ?, ?)",
                (f"m{i}", isoformat(STARTED), isoformat(at(3600))),
            )
        conn.execute(
            "INSERT INTO rollout_machines (rollout_id, machine_id, batch_idx, position, "
            "store_path, health, healthy_since) VALUES ('ro-1', ?, ?, 0, ?, ?, ?)",
            (f"m{i}", i, f.store_path, f.health.value, isoformat(f.healthy_since)),
        )


@pytest.fixture
def rollout_store(any_store: AnyStore) -> AnyStore:
    store = any_store
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO releases (id, created_at, created_by) VALUES ('rel-1', 'x', 'test')"
        )
        conn.execute(
            "INSERT INTO rollouts (id, name, release_id, status, document_json, document_hash, "
            "source, created_at, created_by, updated_at) "
            "VALUES ('ro-1', 'r', 'rel-1', 'running', '{}', '', 'test', 'x', 'test', 'x')"
        )
    return store


@pytest.mark.parametrize(
    ("name", "f", "now", "soak", "reboot"),
    [(*c, False) for c in CASES] + [(*c, True) for c in REBOOT_CASES],
    ids=[c[0] for c in CASES] + [f"reboot: {c[0]}" for c in REBOOT_CASES],
)
def test_sql_verdict_agrees_with_judge(
    rollout_store: AnyStore, name: str, f: MachineFacts, now: float, soak: int, reboot: bool
) -> None:
    _store_case(rollout_store, 0, f)
    v = rollout.judge(f, STARTED, at(now), TIMEOUT, soak, reboot)
    changed = v.health is not f.health or v.healthy_since != f.healthy_since
    params = verdicts.judge_params("ro-1", 0, STARTED, at(now), TIMEOUT, soak, reboot=reboot)
    with rollout_store.read() as conn:
        rows = conn.execute(verdicts.judge_sql(conn), params).fetchall()
    got = [(r["health"], r["reason"], r["healthy_since"]) for r in rows]
    want = [(v.health.value, v.reason if v.health is not P else None, isoformat(v.healthy_since))]
    assert got == (want if changed else []), name


def test_settled_machines_are_not_judged_again(rollout_store: AnyStore) -> None:
    for i, health in enumerate((H, U)):
        _store_case(rollout_store, i, replace(good(current_generation=OLD), health=health))
    params = verdicts.judge_params("ro-1", 0, STARTED, at(TIMEOUT), TIMEOUT, 0)
    with rollout_store.read() as conn:
        for batch in (0, 1):
            rows = conn.execute(verdicts.judge_sql(conn), {**params, "batch": batch}).fetchall()
            assert rows == []


@pytest.mark.parametrize(
    "times",
    [
        [ON_THE_SECOND, at(0.4), at(0.6), BEFORE_ON_THE_SECOND, at(-0.000001), STARTED],
        [datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)],
    ],
)
def test_stored_times_sort_as_times_in_sql(any_store: AnyStore, times: list[datetime]) -> None:
    """Every stored time has one fixed width, so SQL orders the strings as the times."""
    stored = [str(isoformat(t)) for t in times]
    assert {len(s) for s in stored} == {27} and all(s.endswith("Z") for s in stored)
    values = ", ".join("(CAST(? AS TEXT))" for _ in stored)
    with any_store.read() as conn:
        ordered = [
            r[0]
            for r in conn.execute(
                f"SELECT column1 FROM (VALUES {values}) AS v ORDER BY column1",
                stored,
            )
        ]
    assert ordered == [isoformat(t) for t in sorted(times)]
    assert [parse_time(s) for s in stored] == times


def test_a_window_judges_only_its_positions(rollout_store: AnyStore) -> None:
    for i in range(3):
        _store_case(rollout_store, i, good())
    with rollout_store.transaction() as conn:
        conn.execute(
            "UPDATE rollout_machines SET batch_idx = 0, "
            "position = CAST(substr(machine_id, 2) AS INTEGER)"
        )
    judged = {}
    for window in ((-1, 2), (-1, 0), (0, 2), (2, 5)):
        params = verdicts.judge_params("ro-1", 0, STARTED, at(TIMEOUT), TIMEOUT, 0, window)
        with rollout_store.read() as conn:
            rows = conn.execute(verdicts.judge_sql(conn), params).fetchall()
        judged[window] = sorted(r["machine_id"] for r in rows)
    assert judged == {
        (-1, 2): ["m0", "m1", "m2"],
        (-1, 0): ["m0"],
        (0, 2): ["m1", "m2"],
        (2, 5): [],
    }


# --- generated: every combination of the facts judge() looks at ---------------------------

GEN_REPORTS = (None, at(-1), at(-0.000001), STARTED, BEFORE_ON_THE_SECOND, ON_THE_SECOND, at(5))
GEN_CURRENT = (None, GEN, OLD)
GEN_SUCCESS = (None, True, False)
GEN_FAILED = (None, GEN, OLD)
GEN_HEALTH_PASSED = (None, True, False)
GEN_SINCE = (None, at(6), ON_THE_SECOND)
GEN_MESSAGE = (None, "", "rolled back: x.service")
GEN_HEALTH = (P, H, U)
GEN_CLOCK = [
    (now, soak) for now in (10, 60.5, 65.999999, 66, TIMEOUT, TIMEOUT + 1) for soak in (0, SOAK)
]


def _generated() -> list[MachineFacts]:
    out = []
    for i, (report, current, success, failed_gen, passed, since, message, health) in enumerate(
        itertools.product(
            GEN_REPORTS,
            GEN_CURRENT,
            GEN_SUCCESS,
            GEN_FAILED,
            GEN_HEALTH_PASSED,
            GEN_SINCE,
            GEN_MESSAGE,
            GEN_HEALTH,
        )
    ):
        out.append(
            MachineFacts(
                f"g{i:05}",
                GEN,
                health=health,
                healthy_since=since,
                last_report_at=report,
                current_generation=current,
                last_success=success,
                failed_generation=failed_gen,
                health_passed=passed,
                last_message=message,
            )
        )
    return out


def _insert_rows(conn: Connection, insert: str, marks: str, rows: list[tuple[Any, ...]]) -> None:
    """`insert` … VALUES with 500 rows a statement (a round trip per row is seconds on
    PostgreSQL for the generated cases)."""
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        conn.execute(insert + ", ".join([marks] * len(chunk)), [v for r in chunk for v in r])


def _store_many(store: AnyStore, facts: list[MachineFacts]) -> None:
    with store.transaction() as conn:
        _insert_rows(
            conn,
            "INSERT INTO machines (id, lifecycle, registered_at, current_generation, "
            "last_report_at, last_success, failed_generation, health_json, health, "
            "last_message) VALUES ",
            "(?, 'active', ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    f.machine_id,
                    isoformat(STARTED),
                    f.current_generation,
                    isoformat(f.last_report_at),
                    None if f.last_success is None else int(f.last_success),
                    f.failed_generation,
                    None
                    if f.health_passed is None
                    else json.dumps({"all_passed": f.health_passed}),
                    _axis(f),
                    f.last_message,
                )
                for f in facts
            ],
        )
        _insert_rows(
            conn,
            "INSERT INTO rollout_machines (rollout_id, machine_id, batch_idx, position, "
            "store_path, health, healthy_since) VALUES ",
            "('ro-1', ?, 0, ?, ?, ?, ?)",
            [
                (f.machine_id, n, f.store_path, f.health.value, isoformat(f.healthy_since))
                for n, f in enumerate(facts)
            ],
        )


@pytest.mark.parametrize(("now", "soak"), GEN_CLOCK)
def test_sql_verdicts_agree_with_judge_on_every_generated_case(
    rollout_store: AnyStore, now: float, soak: int
) -> None:
    """JUDGE_SQL is held to rollout.judge (the one definition) on every combination."""
    facts = _generated()
    _store_many(rollout_store, facts)
    want = {}
    for f in facts:
        v = rollout.judge(f, STARTED, at(now), TIMEOUT, soak)
        if v.health is not f.health or v.healthy_since != f.healthy_since:
            reason = v.reason if v.health is not P else None
            want[f.machine_id] = (v.health.value, reason, isoformat(v.healthy_since))
    params = verdicts.judge_params("ro-1", 0, STARTED, at(now), TIMEOUT, soak)
    with rollout_store.read() as conn:
        rows = conn.execute(verdicts.judge_sql(conn), params).fetchall()
    got = {r["machine_id"]: (r["health"], r["reason"], r["healthy_since"]) for r in rows}
    assert len(got) == len(rows)
    mismatched = {
        k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)
    }
    assert not mismatched, sorted(mismatched.items())[:5]
    assert len(facts) == 3**7 * len(GEN_REPORTS)
