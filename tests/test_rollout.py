"""The pure rollout rules (nixfleet.rollout), case by case, from tables."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nixfleet import rollout
from nixfleet.errors import ConflictError
from nixfleet.models import (
    BatchStatus,
    Lifecycle,
    MachineHealth,
    OnFailure,
    RolloutStatus,
    Threshold,
)
from nixfleet.rollout import BatchView, MachineFacts, RolloutView

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
GEN = "/nix/store/" + "n" * 32 + "-nixos-system-new"
OLD = "/nix/store/" + "o" * 32 + "-nixos-system-old"


def spec(**doc: Any) -> Any:
    base: dict[str, Any] = {
        "version": 1,
        "name": "r",
        "release": "rel-000000000000",
        "target": {"tags": ["web"]},
        "strategy": "staged",
        "batches": [1, "25%", "100%"],
    }
    base.update(doc)
    return rollout.spec_from_document(base)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- documents and batching ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0), (90, 90), ("90", 90), ("30s", 30), ("5m", 300), ("1h", 3600), ("0s", 0)],
)
def test_durations(value: int | str, seconds: int) -> None:
    assert rollout.parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("strategy", "batches", "total", "sizes"),
    [
        ("staged", [1, "25%", "100%"], 10, [1, 3, 6]),
        ("staged", [1, "25%", "100%"], 1, [1]),
        ("staged", [1, "25%", "100%"], 2, [1, 1]),
        ("staged", [1, "25%", "100%"], 0, []),
        ("staged", ["10%"], 7, [7]),  # the last batch takes all that remain
        ("staged", [2, 2], 10, [2, 8]),
        ("staged", ["33%", "33%", "34%"], 100, [33, 33, 34]),
        ("staged", ["1%", "1%", "1%"], 10, [1, 1, 8]),  # rounded up, at least 1
        ("staged", ["25%", "25%", "25%", "25%"], 10, [3, 3, 3, 1]),  # of the total, rounded up
        ("staged", [5, 5, 5], 3, [3]),  # no empty batches
        ("canary", None, 5, [1, 4]),
        ("canary", [1], 10, [1, 9]),
        ("canary", [2, "50%"], 10, [2, 8]),
        ("canary", [1, 2, 3], 10, [1, 2, 7]),
        ("all-at-once", None, 10, [10]),
        ("all-at-once", [1, 2], 10, [10]),
    ],
)
def test_batch_sizes(
    strategy: str, batches: list[Any] | None, total: int, sizes: list[int]
) -> None:
    doc: dict[str, Any] = {"strategy": strategy}
    doc["batches"] = batches if batches is not None else [1]
    s = spec(**doc)
    if batches is None:
        s = replace(s, batches=())
    assert rollout.batch_sizes(s, total) == sizes


@pytest.mark.parametrize(
    ("threshold", "batch", "allowed"),
    [
        (Threshold(0), 5, 0),
        (Threshold(2), 5, 2),
        (Threshold(10, True), 5, 0),
        (Threshold(10, True), 10, 1),
        (Threshold(50, True), 3, 1),
        (Threshold(100, True), 7, 7),
    ],
)
def test_threshold_counts_and_percentages_round_down(
    threshold: Threshold, batch: int, allowed: int
) -> None:
    assert threshold.allowed(batch) == allowed


def test_document_identity_ignores_key_order() -> None:
    a = {"name": "x", "target": {"tags": ["a"], "hosts": ["b"]}}
    b = {"target": {"hosts": ["b"], "tags": ["a"]}, "name": "x"}
    assert rollout.document_hash(a) == rollout.document_hash(b)
    assert rollout.rollout_id("x", rollout.document_hash(a)) == rollout.rollout_id(
        "x", rollout.document_hash(b)
    )
    assert rollout.rollout_id("y", rollout.document_hash(a)).startswith("ro-")


# --- planning -----------------------------------------------------------------------

ACTIVE = Lifecycle.ACTIVE


@pytest.mark.parametrize(
    ("doc", "release", "tagged", "lifecycles", "batches", "skipped"),
    [
        (  # tags plus hosts, sorted, deterministic
            {"target": {"tags": ["web"], "hosts": ["api-01"]}, "strategy": "all-at-once"},
            {"web-02", "web-01", "api-01"},
            ["web-02", "web-01"],
            {"web-01": ACTIVE, "web-02": ACTIVE, "api-01": ACTIVE},
            [("api-01", "web-01", "web-02")],
            [],
        ),
        (  # hosts missing from the release are skipped and reported
            {"strategy": "all-at-once"},
            {"web-01"},
            ["web-01", "web-02"],
            {"web-01": ACTIVE, "web-02": ACTIVE},
            [("web-01",)],
            [("web-02", "no entry in release rel-000000000000")],
        ),
        (  # a target host that is not registered
            {"target": {"hosts": ["ghost"]}, "strategy": "all-at-once"},
            {"ghost"},
            [],
            {},
            [],
            [("ghost", "not registered with the control plane")],
        ),
        (  # lifecycle skip list
            {"strategy": "canary", "skip_lifecycle": ["maintenance", "decommissioned"]},
            {"a", "b", "c", "d"},
            ["a", "b", "c", "d"],
            {"a": ACTIVE, "b": Lifecycle.MAINTENANCE, "c": ACTIVE, "d": Lifecycle.DECOMMISSIONED},
            [("a",), ("c",)],
            [
                ("b", "lifecycle maintenance is in skip_lifecycle"),
                ("d", "lifecycle decommissioned is in skip_lifecycle"),
            ],
        ),
        (  # lifecycle is informational unless skipped
            {"strategy": "staged", "batches": [1, "100%"]},
            {"a", "b"},
            ["a", "b"],
            {"a": Lifecycle.PENDING, "b": Lifecycle.MAINTENANCE},
            [("a",), ("b",)],
            [],
        ),
    ],
)
def test_plan(
    doc: dict[str, Any],
    release: set[str],
    tagged: list[str],
    lifecycles: dict[str, Lifecycle],
    batches: list[tuple[str, ...]],
    skipped: list[tuple[str, str]],
) -> None:
    p = rollout.plan(spec(**doc), "rel-000000000000", release, tagged, lifecycles)
    assert list(p.batches) == batches
    assert [(s.hostname, s.reason) for s in p.skipped] == skipped


def test_overlap_error_names_the_machines() -> None:
    err = rollout.overlap_error({"web-02": "old", "web-01": "old"})
    assert err.http_status == 409
    assert "web-01 (old), web-02 (old)" in err.detail
    many = rollout.overlap_error({f"m{i:03}": "x" for i in range(25)}, limit=20)
    assert "and 5 more" in many.detail


@pytest.mark.parametrize(
    ("status", "action", "result"),
    [
        (RolloutStatus.RUNNING, "pause", RolloutStatus.PAUSED),
        (RolloutStatus.PAUSED, "resume", RolloutStatus.RUNNING),
        (RolloutStatus.RUNNING, "cancel", RolloutStatus.CANCELLED),
        (RolloutStatus.PAUSED, "cancel", RolloutStatus.CANCELLED),
        (RolloutStatus.PAUSED, "pause", None),
        (RolloutStatus.RUNNING, "resume", None),
        (RolloutStatus.COMPLETED, "cancel", None),
        (RolloutStatus.FAILED, "resume", None),
        (RolloutStatus.CANCELLED, "resume", None),
    ],
)
def test_control_transitions(
    status: RolloutStatus, action: str, result: RolloutStatus | None
) -> None:
    if result is None:
        with pytest.raises(ConflictError, match=f"cannot {action}"):
            rollout.control("r", status, action)
    else:
        assert rollout.control("r", status, action) is result


# --- the health gate ------------------------------------------------------------------

FRESH = at(10)


def facts(**kw: Any) -> MachineFacts:
    return MachineFacts(machine_id="m", store_path=GEN, **kw)


GOOD = {"last_report_at": FRESH, "current_generation": GEN, "last_success": True}


@pytest.mark.parametrize(
    ("f", "now", "soak", "health", "reason", "since"),
    [
        (facts(), at(20), 0, MachineHealth.PENDING, "no report since the batch started", None),
        (
            facts(),
            at(300),
            0,
            MachineHealth.UNHEALTHY,
            "timed out after 5m (no report since the batch started)",
            None,
        ),
        (  # a report from before the batch started does not count
            facts(last_report_at=at(-1), current_generation=GEN, last_success=True),
            at(20),
            0,
            MachineHealth.PENDING,
            "no report since the batch started",
            None,
        ),
        (facts(**GOOD), at(20), 0, MachineHealth.HEALTHY, "healthy", at(20)),
        (facts(**GOOD, health_passed=True), at(20), 0, MachineHealth.HEALTHY, "healthy", at(20)),
        (
            facts(**GOOD, health_passed=False),
            at(20),
            0,
            MachineHealth.PENDING,
            "health checks failing",
            None,
        ),
        (
            facts(**GOOD, health_passed=False),
            at(301),
            0,
            MachineHealth.UNHEALTHY,
            "timed out after 5m (health checks failing)",
            None,
        ),
        (
            facts(last_report_at=FRESH, current_generation=OLD, last_success=True),
            at(20),
            0,
            MachineHealth.PENDING,
            "not yet running the release's generation",
            None,
        ),
        (
            facts(
                last_report_at=FRESH,
                current_generation=OLD,
                last_success=False,
                last_message="rolled back: unit failed",
            ),
            at(20),
            0,
            MachineHealth.UNHEALTHY,
            "agent reported failure: rolled back: unit failed",
            None,
        ),
        (
            # The report that brings the news of this batch still carries the agent's
            # failure of the generation before (it names it): not this batch's failure.
            facts(
                last_report_at=FRESH,
                current_generation=OLD,
                last_success=False,
                failed_generation="/nix/store/" + "e" * 32 + "-nixos-system-before",
                last_message="rolled back: unit failed",
            ),
            at(20),
            0,
            MachineHealth.PENDING,
            "not yet running the release's generation",
            None,
        ),
        (
            facts(
                last_report_at=FRESH,
                current_generation=OLD,
                last_success=True,
                failed_generation=GEN,
            ),
            at(20),
            0,
            MachineHealth.UNHEALTHY,
            "agent reported failure",
            None,
        ),
        # soak: healthy only after staying so for `soak`
        (facts(**GOOD), at(20), 60, MachineHealth.PENDING, "soaking (1m)", at(20)),
        (
            facts(**GOOD, healthy_since=at(20)),
            at(79),
            60,
            MachineHealth.PENDING,
            "soaking (1m)",
            at(20),
        ),
        (facts(**GOOD, healthy_since=at(20)), at(80), 60, MachineHealth.HEALTHY, "healthy", at(20)),
        (  # soaking is not cut short by the health timeout
            facts(**GOOD, healthy_since=at(290)),
            at(320),
            60,
            MachineHealth.PENDING,
            "soaking (1m)",
            at(290),
        ),
        (  # going bad during soak restarts it
            facts(
                last_report_at=FRESH,
                current_generation=GEN,
                last_success=True,
                health_passed=False,
                healthy_since=at(20),
            ),
            at(30),
            60,
            MachineHealth.PENDING,
            "health checks failing",
            None,
        ),
        (  # verdicts stick
            facts(health=MachineHealth.HEALTHY, healthy_since=at(5)),
            at(999),
            0,
            MachineHealth.HEALTHY,
            "",
            at(5),
        ),
    ],
)
def test_judge(
    f: MachineFacts,
    now: datetime,
    soak: int,
    health: MachineHealth,
    reason: str,
    since: datetime | None,
) -> None:
    v = rollout.judge(f, T0, now, 300, soak)
    assert (v.health, v.reason, v.healthy_since) == (health, reason, since)


# --- the next step ------------------------------------------------------------------


def view(
    statuses: list[BatchStatus],
    status: RolloutStatus = RolloutStatus.RUNNING,
    sizes: list[int] | None = None,
    **doc: Any,
) -> RolloutView:
    sizes = sizes or [1] * len(statuses)
    batches = tuple(
        BatchView(i, s, sizes[i], T0 if s is BatchStatus.DEPLOYING else None)
        for i, s in enumerate(statuses)
    )
    return RolloutView("ro-1", "r", status, spec(**doc), batches)


P, D, S, F = BatchStatus.PENDING, BatchStatus.DEPLOYING, BatchStatus.SUCCEEDED, BatchStatus.FAILED
H, U = MachineHealth.HEALTHY, MachineHealth.UNHEALTHY


def healthy(name: str) -> MachineFacts:
    return MachineFacts(name, GEN, last_report_at=FRESH, current_generation=GEN, last_success=True)


def failing(name: str) -> MachineFacts:
    return MachineFacts(name, GEN, last_report_at=FRESH, current_generation=OLD, last_success=False)


def silent(name: str) -> MachineFacts:
    return MachineFacts(name, GEN)


def decide(
    v: RolloutView,
    pending: list[MachineFacts],
    settled: dict[MachineHealth, int],
    now: datetime,
) -> tuple[list[rollout.Verdict], rollout.Decision]:
    """What a reconciler tick does, in pure form: judge the deploying batch's pending
    machines (the reconciler does this set-based in SQL), tally, advance; the verdicts
    that changed, and the decision with the machine-unhealthy events first."""
    deploying = rollout.deploying_batch(v) if v.status is RolloutStatus.RUNNING else None
    changed: list[rollout.Verdict] = []
    events: list[rollout.Event] = []
    tally = None
    if deploying is not None:
        assert deploying.started_at is not None
        unhealthy = settled.get(U, 0)
        waiting = settled.get(MachineHealth.PENDING, 0)
        for f in pending:
            verdict = rollout.judge(
                f, deploying.started_at, now, v.spec.health_timeout, v.spec.soak
            )
            if verdict.health is not f.health or verdict.healthy_since != f.healthy_since:
                changed.append(verdict)
            if verdict.health is U:
                unhealthy += 1
                events.append(
                    rollout.Event(
                        "machine-unhealthy",
                        deploying.index,
                        verdict.machine_id,
                        {"reason": verdict.reason},
                    )
                )
            elif verdict.health is MachineHealth.PENDING:
                waiting += 1
        tally = rollout.Tally(unhealthy, waiting)
    out = rollout.advance(v, tally)
    out.events[:0] = events
    out.judged = len(changed)
    return changed, out


@pytest.mark.parametrize(
    ("v", "pending", "settled", "now", "start", "batch_status", "status", "revert", "kinds"),
    [
        # nothing deploying: start the first pending batch
        (view([P, P]), [], {}, at(1), 0, {0: D}, None, False, ["batch-started"]),
        # a batch whose machines are all healthy succeeds, and the next one starts
        (
            view([D, P]),
            [healthy("a")],
            {},
            at(20),
            1,
            {0: S, 1: D},
            None,
            False,
            ["batch-succeeded", "batch-started"],
        ),
        # the last batch succeeding completes the rollout
        (
            view([S, D]),
            [healthy("a")],
            {},
            at(20),
            None,
            {1: S},
            RolloutStatus.COMPLETED,
            False,
            ["batch-succeeded", "rollout-completed"],
        ),
        # still waiting on a machine
        (view([D, P], sizes=[2, 1]), [silent("b")], {H: 1}, at(20), None, {}, None, False, []),
        # one failure over a threshold of 0 pauses, without waiting for the rest
        (
            view([D, P], sizes=[3, 1]),
            [failing("a"), silent("b")],
            {H: 1},
            at(20),
            None,
            {0: F},
            RolloutStatus.PAUSED,
            False,
            ["machine-unhealthy", "batch-failed", "rollout-paused"],
        ),
        # within a count threshold the batch waits, then succeeds
        (
            view([D, P], sizes=[3, 1], failure_threshold=1),
            [failing("a"), silent("b")],
            {H: 1},
            at(20),
            None,
            {},
            None,
            False,
            ["machine-unhealthy"],
        ),
        (
            view([D, P], sizes=[3, 1], failure_threshold=1),
            [healthy("b")],
            {H: 1, U: 1},
            at(20),
            1,
            {0: S, 1: D},
            None,
            False,
            ["batch-succeeded", "batch-started"],
        ),
        # percentage threshold: 10% of 10 allows one, not two
        (
            view([D], sizes=[10], failure_threshold="10%"),
            [],
            {H: 9, U: 1},
            at(20),
            None,
            {0: S},
            RolloutStatus.COMPLETED,
            False,
            ["batch-succeeded", "rollout-completed"],
        ),
        (
            view([D], sizes=[10], failure_threshold="10%"),
            [],
            {H: 8, U: 2},
            at(20),
            None,
            {0: F},
            RolloutStatus.PAUSED,
            False,
            ["batch-failed", "rollout-paused"],
        ),
        # health timeout turns silence into failure
        (
            view([D]),
            [silent("a")],
            {},
            at(300),
            None,
            {0: F},
            RolloutStatus.PAUSED,
            False,
            ["machine-unhealthy", "batch-failed", "rollout-paused"],
        ),
        # revert policy: every touched machine goes back, the rollout fails
        (
            view([S, D, P], on_failure="revert"),
            [failing("a")],
            {},
            at(20),
            None,
            {1: F},
            RolloutStatus.FAILED,
            True,
            ["machine-unhealthy", "batch-failed", "rollout-reverted", "rollout-failed"],
        ),
        # a resumed rollout re-runs its requeued batch
        (view([S, P, P]), [], {}, at(20), 1, {1: D}, None, False, ["batch-started"]),
        # paused and finished rollouts do nothing
        (
            view([D], status=RolloutStatus.PAUSED),
            [failing("a")],
            {},
            at(20),
            None,
            {},
            None,
            False,
            [],
        ),
        (view([S], status=RolloutStatus.CANCELLED), [], {}, at(20), None, {}, None, False, []),
    ],
)
def test_decide(
    v: RolloutView,
    pending: list[MachineFacts],
    settled: dict[MachineHealth, int],
    now: datetime,
    start: int | None,
    batch_status: dict[int, BatchStatus],
    status: RolloutStatus | None,
    revert: bool,
    kinds: list[str],
) -> None:
    _, d = decide(v, pending, settled, now)
    assert d.start_batch == start
    assert d.batch_status == batch_status
    assert d.status == status
    assert d.revert is revert
    assert [e.kind for e in d.events] == kinds


def test_decide_is_idempotent_and_reports_only_changed_verdicts() -> None:
    v = view([D], sizes=[2])
    verdicts, first = decide(v, [healthy("a"), silent("b")], {}, at(20))
    assert [(x.machine_id, x.health) for x in verdicts] == [("a", H)]
    verdicts_again, again = decide(v, [healthy("a"), silent("b")], {}, at(20))
    assert verdicts_again == verdicts and again.events == first.events
    assert decide(v, [silent("b")], {H: 1}, at(20))[1].empty


def test_spec_defaults() -> None:
    s = spec()
    assert s.on_failure is OnFailure.PAUSE
    assert s.health_timeout == 300 and s.soak == 0
    assert s.failure_threshold == Threshold(0)
