"""What holds a running rollout back, and the reconciler decision with it applied. Pure.

Two holds (DESIGN §11), shown by `rollout status` and recorded as an event (and an
audit row) when they begin, change or end, never once per tick:
- `waiting-for-window`: the next batch may start only inside a maintenance window,
  with at least `health_timeout` of it left, so that a batch that starts can deploy,
  reboot and be judged inside the window (a window shorter than that is used as it
  is); a batch already deploying always finishes;
- `held-by-budget`: the deploying batch's next machine would exceed the rollout's
  `max_unavailable` or a fleet-wide disruption budget (nixfleet.policy.budgets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from nixfleet import rollout
from nixfleet.models import isoformat
from nixfleet.policy import budgets
from nixfleet.policy import windows as windows_mod
from nixfleet.policy.windows import Window

WAITING_FOR_WINDOW = "waiting-for-window"
HELD_BY_BUDGET = "held-by-budget"


@dataclass(frozen=True)
class Hold:
    kind: str
    detail: str
    until: datetime | None = None  # when a window hold ends (None: when a slot frees)

    def label(self) -> str:
        return f"{self.kind}: {self.detail}"


def start_time(windows: Sequence[Window], now: datetime, need: int) -> datetime | None:
    """The earliest instant ≥ now at which a batch may start (None: none within a week).

    Inside a window with at least `need` seconds left: now. Otherwise the next opening
    of a window that long; if no window is that long, the next opening of any.
    """
    if not windows:
        return now
    cur = windows_mod.current(windows, now)
    if cur is not None and (cur[1] - now) >= timedelta(seconds=need):
        return now
    long_enough: datetime | None = None
    any_start: datetime | None = None
    for start, end in windows_mod.intervals(windows, now):
        if start <= now:
            continue  # past, or the current one, already found too short
        any_start = start if any_start is None else any_start
        if (end - start) >= timedelta(seconds=need):
            long_enough = start
            break
    if long_enough is not None:
        return long_enough
    if cur is not None:
        return now  # every window is shorter than `need`: use them as they are
    return any_start


def window_hold(windows: Sequence[Window], now: datetime, need: int) -> Hold | None:
    """None when a batch may start now; else the hold, saying when it may."""
    when = start_time(windows, now, need)
    if when == now:
        return None
    labels = "; ".join(w.label() for w in windows)
    if when is None:
        return Hold(WAITING_FOR_WINDOW, f"no window opens within a week ({labels})")
    return Hold(WAITING_FOR_WINDOW, f"next batch starts at {isoformat(when)} ({labels})", when)


def without_start(decision: rollout.Decision) -> rollout.Decision:
    """The decision with its batch start taken out (what finished still finishes)."""
    if decision.start_batch is None:
        return decision
    index = decision.start_batch
    status = {i: s for i, s in decision.batch_status.items() if i != index}
    events = [e for e in decision.events if not (e.kind == "batch-started" and e.batch == index)]
    return replace(decision, start_batch=None, batch_status=status, events=events)


def hold_events(
    before: tuple[str | None, str | None], after: Hold | None, batch: int | None
) -> list[rollout.Event]:
    """The events of a hold changing (`before` is the stored kind and detail)."""
    kind, detail = before
    if after is None:
        if kind is None:
            return []
        return [rollout.Event("rollout-hold-cleared", batch, detail={"was": kind})]
    if (after.kind, _stable(after)) == (kind, _stable_text(after.kind, detail)):
        return []
    out: dict[str, str] = {"detail": after.detail}
    if after.until is not None:
        out["until"] = isoformat(after.until) or ""
    return [rollout.Event(f"rollout-{after.kind}", batch, detail=out)]


def _stable(h: Hold) -> str:
    return _stable_text(h.kind, h.detail)


def _stable_text(kind: str | None, detail: str | None) -> str:
    """A budget hold's detail names the budget; its counts may change without an event."""
    text = detail or ""
    if kind == HELD_BY_BUDGET:
        return text.split(" (")[0]
    return text


# --- rollout plan: when each batch can start, and what holds it ----------------------


@dataclass(frozen=True)
class Outlook:
    """What `rollout plan` says of one batch (DESIGN §11)."""

    earliest: datetime | None  # its earliest start (None: no window within a week)
    waiting_for: str | None  # the window it waits for, when not now
    at_once: int  # how many of its machines may start at once, as the fleet is now
    held_by: str | None  # the limit behind `at_once`, when it is not the whole batch


def outlook(
    batches: Sequence[Sequence[frozenset[str]]],
    windows: Sequence[Window],
    now: datetime,
    health_timeout: int,
    soak: int,
    limits: Sequence[budgets.Room],
) -> list[Outlook]:
    """Per batch: the earliest start (each batch at least `soak` after the one before,
    inside a window) and how many of its machines the budgets let start at once."""
    out: list[Outlook] = []
    at: datetime | None = now
    for tags in batches:
        if at is not None:
            at = start_time(windows, at, health_timeout)
        label = "; ".join(w.label() for w in windows) if windows and at != now else None
        admitted = budgets.admit(list(tags), limits)
        out.append(Outlook(at, label, admitted.count, admitted.held_by))
        if at is not None:
            at = at + timedelta(seconds=soak)
    return out
