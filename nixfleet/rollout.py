"""Pure rollout decisions: batching, the health gate, thresholds, the next step.

Nothing here does I/O or reads the clock: callers pass `now` and the facts they
read from the database, and apply what comes back (nixfleet.reconciler). That keeps
every rule of DESIGN §3 "Rollout semantics" testable from a table of cases, and
makes a tick idempotent: the same facts always give the same decision.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nixfleet.errors import ConflictError
from nixfleet.models import (
    BatchSize,
    BatchStatus,
    Lifecycle,
    MachineHealth,
    OnFailure,
    RolloutSpec,
    RolloutStatus,
    Strategy,
    Threshold,
)
from nixfleet.policy import RolloutPolicy

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}

# --- documents ----------------------------------------------------------------------


def parse_duration(value: int | str) -> int:
    """Seconds from 90, "90", "30s", "5m" or "1h" (the schema has checked the shape)."""
    if isinstance(value, int):
        return value
    text = value.strip()
    unit = text[-1] if text and text[-1] in DURATION_UNITS else "s"
    number = text[:-1] if text and text[-1] in DURATION_UNITS else text
    return int(number) * DURATION_UNITS[unit]


def format_duration(seconds: int) -> str:
    """The shortest exact spelling: 300 -> "5m", 90 -> "90s"."""
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


SCHEMA = "rollout"  # schemas/rollout.schema.json: API bodies and GitOps rollout files


def _percent_or_count(value: int | str) -> tuple[int, bool]:
    if isinstance(value, str) and value.endswith("%"):
        return int(value[:-1]), True
    return int(value), False


def spec_from_document(doc: Mapping[str, Any]) -> RolloutSpec:
    """A RolloutSpec from a document that `schemas.validate(SCHEMA, …)` accepted."""
    target = doc.get("target", {})
    return RolloutSpec(
        name=doc["name"],
        release=doc["release"],
        strategy=Strategy(doc["strategy"]),
        target_tags=tuple(target.get("tags", ())),
        target_hosts=tuple(target.get("hosts", ())),
        batches=tuple(BatchSize(*_percent_or_count(b)) for b in doc.get("batches", ())),
        failure_threshold=Threshold(*_percent_or_count(doc.get("failure_threshold", 0))),
        on_failure=OnFailure(doc.get("on_failure", "pause")),
        health_timeout=parse_duration(doc.get("health_timeout", 300)),
        soak=parse_duration(doc.get("soak", 0)),
        confirm_timeout=(
            parse_duration(doc["confirm_timeout"]) if "confirm_timeout" in doc else None
        ),
        skip_lifecycle=tuple(Lifecycle(s) for s in doc.get("skip_lifecycle", ())),
    )


def document_hash(doc: Mapping[str, Any]) -> str:
    """Identity of a document's content, independent of key order and YAML formatting."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def rollout_id(name: str, doc_hash: str) -> str:
    """Same name and content -> same id: re-applying a file is recognisably a no-op."""
    return "ro-" + hashlib.sha256(f"{name}\0{doc_hash}".encode()).hexdigest()[:12]


# --- planning -----------------------------------------------------------------------


def _size(size: BatchSize, total: int) -> int:
    if size.percent:
        return max(1, math.ceil(size.value * total / 100))
    return size.value


def batch_sizes(spec: RolloutSpec, total: int) -> list[int]:
    """Batch sizes for `total` targets; the last batch takes all that remain.

    Percentages are of the total target count, rounded up, at least 1. Sizes that
    would come after every machine is placed are dropped (no empty batches).
    """
    if total <= 0:
        return []
    if spec.strategy is Strategy.ALL_AT_ONCE:
        return [total]
    wanted = list(spec.batches)
    if spec.strategy is Strategy.CANARY:
        wanted = wanted or [BatchSize(1)]
        if len(wanted) == 1:  # the canary alone, then everything else
            wanted.append(BatchSize(100, percent=True))
    sizes: list[int] = []
    left = total
    for i, size in enumerate(wanted):
        last = i == len(wanted) - 1
        n = left if last else min(left, _size(size, total))
        sizes.append(n)
        left -= n
        if left == 0:
            break
    return sizes


@dataclass(frozen=True)
class Skip:
    hostname: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """What `apply` will create: machines per batch, in order, and who is left out."""

    batches: tuple[tuple[str, ...], ...]
    skipped: tuple[Skip, ...]

    @property
    def targets(self) -> list[str]:
        return [h for b in self.batches for h in b]


def plan(
    spec: RolloutSpec,
    release_id: str,
    release_hosts: Iterable[str],
    tagged: Iterable[str],
    lifecycles: Mapping[str, Lifecycle],
) -> Plan:
    """Targets = (tagged machines) + (target hosts), minus skips; sorted by hostname.

    `tagged` are the registered machines carrying all target tags, `lifecycles` the
    state of every candidate that is registered.
    """
    in_release = set(release_hosts)
    candidates = sorted(set(tagged) | set(spec.target_hosts))
    targets: list[str] = []
    skipped: list[Skip] = []
    skip_states = set(spec.skip_lifecycle)
    for host in candidates:
        state = lifecycles.get(host)
        if state is None:
            skipped.append(Skip(host, "not registered with the control plane"))
        elif state in skip_states:
            skipped.append(Skip(host, f"lifecycle {state} is in skip_lifecycle"))
        elif host not in in_release:
            skipped.append(Skip(host, f"no entry in release {release_id}"))
        else:
            targets.append(host)
    out: list[tuple[str, ...]] = []
    start = 0
    for n in batch_sizes(spec, len(targets)):
        out.append(tuple(targets[start : start + n]))
        start += n
    return Plan(tuple(out), tuple(skipped))


def overlap_error(conflicts: Mapping[str, str], limit: int = 20) -> ConflictError:
    """409 naming the machines (machine -> the active rollout that owns it)."""
    names = sorted(conflicts)
    shown = ", ".join(f"{m} ({conflicts[m]})" for m in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ConflictError(
        f"{len(names)} machine(s) already belong to an active rollout: {shown}{more}; "
        "wait for it, or cancel it with `nixfleet rollout cancel ID`"
    )


# --- control ------------------------------------------------------------------------

CONTROL: dict[str, dict[RolloutStatus, RolloutStatus]] = {
    "pause": {RolloutStatus.RUNNING: RolloutStatus.PAUSED},
    "resume": {RolloutStatus.PAUSED: RolloutStatus.RUNNING},
    "cancel": {
        RolloutStatus.RUNNING: RolloutStatus.CANCELLED,
        RolloutStatus.PAUSED: RolloutStatus.CANCELLED,
    },
}


def control(rollout: str, status: RolloutStatus, action: str) -> RolloutStatus:
    """The status after an operator's pause/resume/cancel, or 409 saying why not."""
    target = CONTROL[action].get(status)
    if target is None:
        allowed = ", ".join(sorted(s.value for s in CONTROL[action]))
        raise ConflictError(
            f"cannot {action} rollout {rollout!r}: it is {status} (needs {allowed})"
        )
    return target


# --- the health gate ------------------------------------------------------------------


@dataclass(frozen=True)
class MachineFacts:
    """One machine of a deploying batch: its rollout row plus its latest report."""

    machine_id: str
    store_path: str
    health: MachineHealth = MachineHealth.PENDING
    healthy_since: datetime | None = None
    last_report_at: datetime | None = None
    current_generation: str | None = None
    last_success: bool | None = None
    failed_generation: str | None = None
    health_passed: bool | None = None  # None: the agent sent no health result
    last_message: str | None = None
    # DESIGN §11: when the machine was given its generation (machines.desired_set_at;
    # under a disruption budget later than the batch's start), whether it needs a
    # reboot, and whether it holds a reboot lease.
    given_at: datetime | None = None
    needs_reboot: bool | None = None
    rebooting: bool = False


@dataclass(frozen=True)
class Verdict:
    machine_id: str
    health: MachineHealth
    reason: str
    healthy_since: datetime | None = None


def judge(
    f: MachineFacts,
    started: datetime,
    now: datetime,
    health_timeout: int,
    soak: int,
    reboot: bool = False,
) -> Verdict:
    """Healthy, unhealthy or still pending, counting only reports since `started`.

    `started` is the batch's start, or the machine's own when it was given its
    generation later (a disruption budget held it back): its health timeout counts
    from then. With `reboot` (the rollout says `reboot: when-needed`) a machine that
    still needs a reboot, or is rebooting, is not healthy yet.
    A final verdict (healthy/unhealthy) sticks for the rest of the batch run.
    """
    if f.health is not MachineHealth.PENDING:
        return Verdict(f.machine_id, f.health, "", f.healthy_since)
    if f.given_at is not None and f.given_at > started:
        started = f.given_at
    rebooting = reboot and (f.rebooting or f.needs_reboot is True)
    fresh = f.last_report_at is not None and f.last_report_at >= started
    # A failure that names another generation is not this batch's: the agent keeps
    # reporting its last failure until it has seen the new desired generation, so
    # the first report after the batch starts may still carry the previous one.
    failed = f.failed_generation == f.store_path or (
        f.last_success is False and f.failed_generation is None
    )
    if fresh and failed:
        detail = f": {f.last_message}" if f.last_message else ""
        return Verdict(f.machine_id, MachineHealth.UNHEALTHY, f"agent reported failure{detail}")
    good = (
        fresh
        and f.current_generation == f.store_path
        and f.last_success is not False
        and f.health_passed is not False
        and not rebooting
    )
    if good:
        since = f.healthy_since or now
        if (now - since).total_seconds() >= soak:
            return Verdict(f.machine_id, MachineHealth.HEALTHY, "healthy", since)
        return Verdict(
            f.machine_id, MachineHealth.PENDING, f"soaking ({format_duration(soak)})", since
        )
    if not fresh:
        waiting = "no report since the batch started"
    elif f.current_generation != f.store_path:
        waiting = "not yet running the release's generation"
    elif f.last_success is False:
        waiting = "still reporting the failure of another generation"
    elif f.health_passed is False:
        waiting = "health checks failing"
    else:
        waiting = "rebooting" if f.rebooting else "needs a reboot"
    if (now - started).total_seconds() >= health_timeout:
        return Verdict(
            f.machine_id,
            MachineHealth.UNHEALTHY,
            f"timed out after {format_duration(health_timeout)} ({waiting})",
        )
    return Verdict(f.machine_id, MachineHealth.PENDING, waiting)


# --- the next step of a rollout ---------------------------------------------------------


@dataclass(frozen=True)
class BatchView:
    index: int
    status: BatchStatus
    size: int
    started_at: datetime | None = None


@dataclass(frozen=True)
class RolloutView:
    id: str
    name: str
    status: RolloutStatus
    spec: RolloutSpec
    batches: tuple[BatchView, ...]
    policy: RolloutPolicy = field(default_factory=RolloutPolicy)  # DESIGN §11 fields


@dataclass(frozen=True)
class Event:
    """A state change: becomes a rollout_events row and an audit row."""

    kind: str
    batch: int | None = None
    machine_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tally:
    """The deploying batch once this tick's verdicts are in: the inputs to its fate."""

    unhealthy: int
    waiting: int  # machines still pending (no final verdict yet)


@dataclass
class Decision:
    batch_status: dict[int, BatchStatus] = field(default_factory=dict)
    start_batch: int | None = None
    revert: bool = False
    status: RolloutStatus | None = None
    events: list[Event] = field(default_factory=list)
    judged: int = 0  # verdicts the store changed (set-based, store.verdicts.judge_batch)
    written: int = 0  # desired generations written for a batch still starting

    @property
    def empty(self) -> bool:
        return not (
            self.judged
            or self.written
            or self.batch_status
            or self.start_batch is not None
            or self.status
        )


def batch_positions(rollout: RolloutView, batch: int) -> tuple[int, int]:
    """The batch's positions (first, last): apply numbers a rollout's targets in batch order."""
    first = sum(b.size for b in rollout.batches[:batch])
    return first, first + rollout.batches[batch].size - 1


def deploying_batch(rollout: RolloutView) -> BatchView | None:
    return next((b for b in rollout.batches if b.status is BatchStatus.DEPLOYING), None)


def advance(rollout: RolloutView, tally: Tally | None) -> Decision:
    """Batch and rollout transitions of a running rollout, from its deploying batch's tally.

    `tally` is None when no batch is deploying. The per-machine verdicts behind it
    are `judge`'s, computed set-based by its SQL form (store.verdicts.JUDGE_SQL, held
    to `judge` case by case by tests/store/test_verdicts.py); this is the part that
    needs no machine rows, so a 100,000-machine batch is decided from two numbers.
    """
    out = Decision()
    if rollout.status is not RolloutStatus.RUNNING:
        return out
    spec = rollout.spec
    deploying = deploying_batch(rollout)
    if deploying is not None:
        assert tally is not None, "a deploying batch needs its tally"
        unhealthy = tally.unhealthy
        allowed = spec.failure_threshold.allowed(deploying.size)
        if unhealthy > allowed:
            out.batch_status[deploying.index] = BatchStatus.FAILED
            detail = {"unhealthy": unhealthy, "allowed": allowed, "on_failure": spec.on_failure}
            out.events.append(Event("batch-failed", deploying.index, detail=detail))
            if spec.on_failure is OnFailure.REVERT:
                out.revert = True
                out.status = RolloutStatus.FAILED
                out.events.append(Event("rollout-reverted", deploying.index))
                out.events.append(Event("rollout-failed", deploying.index))
            else:
                out.status = RolloutStatus.PAUSED
                out.events.append(Event("rollout-paused", deploying.index, detail=detail))
            return out
        if tally.waiting:
            return out
        out.batch_status[deploying.index] = BatchStatus.SUCCEEDED
        out.events.append(
            Event("batch-succeeded", deploying.index, detail={"unhealthy": unhealthy})
        )
    nxt = next(
        (
            b
            for b in rollout.batches
            if b.status is BatchStatus.PENDING and b.index not in out.batch_status
        ),
        None,
    )
    if nxt is not None:
        out.start_batch = nxt.index
        out.batch_status[nxt.index] = BatchStatus.DEPLOYING
        out.events.append(Event("batch-started", nxt.index, detail={"size": nxt.size}))
        return out
    out.status = RolloutStatus.COMPLETED
    out.events.append(Event("rollout-completed"))
    return out
