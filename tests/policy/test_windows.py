"""Maintenance windows (nixfleet.policy.windows), from tables, DST boundaries included."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nixfleet.policy import windows
from nixfleet.policy.windows import Window


def z(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def win(**item: Any) -> Window:
    return windows.from_document(item)


OFFICE = win(
    days=["mon", "tue", "wed", "thu"], start="09:00", end="16:00", timezone="Europe/Berlin"
)
FRI_NIGHT = win(days=["fri"], start="22:00", end="02:00")  # UTC, crosses midnight
# Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET.
GAP = win(start="02:30", end="04:00", timezone="Europe/Berlin")
OVERLAP = win(start="01:00", end="02:30", timezone="Europe/Berlin")
NIGHT_BERLIN = win(start="00:00", end="06:00", timezone="Europe/Berlin")
SAT_LATE = win(days=["sat"], start="22:00", end="24:00")
# America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT (07:00Z): 02:00-03:00 is empty that day.
NY_SKIPPED = win(start="02:00", end="03:00", timezone="America/New_York")
# Every day, the whole day: one window without a break (its occurrences touch).
ALWAYS_BERLIN = win(start="00:00", end="24:00", timezone="Europe/Berlin")
SUN_EARLY = win(days=["sun"], start="00:00", end="04:00")  # with SAT_LATE: one night


@pytest.mark.parametrize(
    ("w", "now", "is_open"),
    [
        (OFFICE, "2026-12-02T08:00:00Z", True),  # Wed 09:00 CET: start is inside
        (OFFICE, "2026-12-02T07:59:59Z", False),
        (OFFICE, "2026-12-02T14:59:59Z", True),
        (OFFICE, "2026-12-02T15:00:00Z", False),  # 16:00 CET: end is outside
        (OFFICE, "2026-12-04T10:00:00Z", False),  # Friday
        (OFFICE, "2026-07-01T07:00:00Z", True),  # summer: 09:00 CEST is 07:00Z
        (OFFICE, "2026-07-01T06:59:00Z", False),
        (OFFICE, "2026-07-01T14:00:00Z", False),  # 16:00 CEST
        (FRI_NIGHT, "2026-12-04T22:00:00Z", True),
        (FRI_NIGHT, "2026-12-04T21:59:59Z", False),
        (FRI_NIGHT, "2026-12-05T01:59:59Z", True),  # Saturday, the night that began Friday
        (FRI_NIGHT, "2026-12-05T02:00:00Z", False),
        (FRI_NIGHT, "2026-12-05T22:30:00Z", False),  # Saturday night is not Friday night
        (FRI_NIGHT, "2026-12-04T01:00:00Z", False),  # Friday early: Thursday's night
        (SAT_LATE, "2026-12-05T23:59:59Z", True),
        (SAT_LATE, "2026-12-06T00:00:00Z", False),
        # Spring forward: 02:30 does not exist; the window opens when the gap ends.
        (GAP, "2026-03-29T00:59:59Z", False),
        (GAP, "2026-03-29T01:00:00Z", True),  # 03:00 CEST
        (GAP, "2026-03-29T01:59:59Z", True),
        (GAP, "2026-03-29T02:00:00Z", False),  # 04:00 CEST
        (GAP, "2026-03-28T01:30:00Z", True),  # the day before: 02:30 CET
        # Fall back: 02:30 happens twice; the window ends at the first.
        (OVERLAP, "2026-10-24T23:00:00Z", True),  # 01:00 CEST
        (OVERLAP, "2026-10-25T00:29:59Z", True),  # 02:29 CEST
        (OVERLAP, "2026-10-25T00:30:00Z", False),  # 02:30 CEST
        (OVERLAP, "2026-10-25T01:15:00Z", False),  # 02:15 CET: the clock reads inside again
        (OVERLAP, "2026-10-25T23:30:00Z", False),  # 00:30 CET on the 26th
        (OVERLAP, "2026-10-26T00:00:00Z", True),  # 01:00 CET on the 26th
        (NY_SKIPPED, "2026-03-08T07:00:00Z", False),
        (NY_SKIPPED, "2026-03-07T07:30:00Z", True),  # 02:30 EST the day before
    ],
)
def test_is_open(w: Window, now: str, is_open: bool) -> None:
    assert windows.is_open([w], z(now)) is is_open


@pytest.mark.parametrize(
    ("ws", "now", "expected"),
    [
        ([], "2026-12-02T03:00:00Z", "2026-12-02T03:00:00Z"),  # no windows: always open
        ([OFFICE], "2026-12-02T10:00:00Z", "2026-12-02T10:00:00Z"),  # open: now
        ([OFFICE], "2026-12-02T06:00:00Z", "2026-12-02T08:00:00Z"),
        ([OFFICE], "2026-12-03T15:00:00Z", "2026-12-07T08:00:00Z"),  # Thu after -> Monday
        ([OFFICE], "2026-03-26T16:00:00Z", "2026-03-30T07:00:00Z"),  # across spring forward
        ([OFFICE], "2026-10-22T16:00:00Z", "2026-10-26T08:00:00Z"),  # across fall back
        ([FRI_NIGHT], "2026-12-05T02:00:00Z", "2026-12-11T22:00:00Z"),
        ([GAP], "2026-03-29T00:00:00Z", "2026-03-29T01:00:00Z"),  # gap: when it ends
        ([OVERLAP], "2026-10-25T00:45:00Z", "2026-10-26T00:00:00Z"),
        ([NY_SKIPPED], "2026-03-08T06:00:00Z", "2026-03-09T06:00:00Z"),  # empty day skipped
        ([OFFICE, FRI_NIGHT], "2026-12-04T09:00:00Z", "2026-12-04T22:00:00Z"),
    ],
)
def test_next_open(ws: list[Window], now: str, expected: str) -> None:
    assert windows.next_open(ws, z(now)) == z(expected)


@pytest.mark.parametrize(
    ("w", "day", "hours"),
    [
        (NIGHT_BERLIN, "2026-03-29", 5),  # an hour skipped
        (NIGHT_BERLIN, "2026-10-25", 7),  # an hour repeated
        (NIGHT_BERLIN, "2026-06-01", 6),
        (OFFICE, "2026-03-30", 7),
    ],
)
def test_occurrence_lengths_are_real_time(w: Window, day: str, hours: int) -> None:
    occ = w.occurrence(datetime.fromisoformat(day).date())
    assert occ is not None
    assert occ[1] - occ[0] == timedelta(hours=hours)


def test_current_gives_the_open_interval() -> None:
    assert windows.current([OFFICE], z("2026-12-02T10:00:00Z")) == (
        z("2026-12-02T08:00:00Z"),
        z("2026-12-02T15:00:00Z"),
    )
    assert windows.current([OFFICE], z("2026-12-02T16:00:00Z")) is None


@pytest.mark.parametrize(
    ("ws", "now", "expected"),
    [
        # 23:19 CET: the day's occurrence closes at midnight, the next opens then: one
        # stretch, from a day back to the look-ahead (8 days)
        ([ALWAYS_BERLIN], "2026-12-02T22:19:00Z", ("2026-11-30T23:00:00Z", "2026-12-10T23:00:00Z")),
        # Saturday 22:00 to Sunday 04:00 UTC, from two windows
        (
            [SAT_LATE, SUN_EARLY],
            "2026-12-05T23:30:00Z",
            ("2026-12-05T22:00:00Z", "2026-12-06T04:00:00Z"),
        ),
        (
            [SUN_EARLY, SAT_LATE],
            "2026-12-06T01:00:00Z",
            ("2026-12-05T22:00:00Z", "2026-12-06T04:00:00Z"),
        ),
        # overlapping occurrences of two windows
        (
            [OFFICE, win(start="15:00", end="18:00", timezone="Europe/Berlin")],
            "2026-12-02T16:30:00Z",
            ("2026-12-02T08:00:00Z", "2026-12-02T17:00:00Z"),
        ),
        ([SAT_LATE], "2026-12-05T23:30:00Z", ("2026-12-05T22:00:00Z", "2026-12-06T00:00:00Z")),
    ],
)
def test_touching_occurrences_are_one_stretch(
    ws: list[Window], now: str, expected: tuple[str, str]
) -> None:
    assert windows.current(ws, z(now)) == (z(expected[0]), z(expected[1]))


def test_days_default_to_every_day_and_labels_read_back() -> None:
    assert win(start="01:00", end="02:00").days == windows.ALL_DAYS
    assert OFFICE.label() == "mon,tue,wed,thu 09:00-16:00 Europe/Berlin"
    assert SAT_LATE.label() == "sat 22:00-24:00 UTC"


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([{"start": "09:00", "end": "16:00", "timezone": "Europe/Berlin"}], []),
        ([{"start": "00:00", "end": "24:00"}], []),
        (
            [{"start": "09:00", "end": "16:00", "timezone": "Mars/Olympus"}],
            ["windows[0].timezone"],
        ),
        ([{"start": "09:00", "end": "09:00"}], ["windows[0].end"]),
        ([{}, {"start": "24:00", "end": "02:00"}], ["windows[1].start"]),
        ("not a list", []),  # the schema says that one
    ],
)
def test_errors_name_the_field(items: Any, expected: list[str]) -> None:
    assert [e.field for e in windows.errors(items)] == expected


# --- the batch gate -------------------------------------------------------------------

from nixfleet import rollout  # noqa: E402
from nixfleet.models import BatchStatus  # noqa: E402
from nixfleet.policy import gate  # noqa: E402

SHORT = win(days=["mon"], start="09:00", end="09:10")  # 10 minutes, UTC


@pytest.mark.parametrize(
    ("ws", "now", "need", "expected"),
    [
        ([], "2026-12-02T03:00:00Z", 300, "2026-12-02T03:00:00Z"),
        ([OFFICE], "2026-12-02T10:00:00Z", 300, "2026-12-02T10:00:00Z"),
        # 15:57 CET: three minutes left of a window, five needed -> tomorrow 09:00
        ([OFFICE], "2026-12-02T14:57:00Z", 300, "2026-12-03T08:00:00Z"),
        ([OFFICE], "2026-12-02T14:55:00Z", 300, "2026-12-02T14:55:00Z"),
        ([OFFICE], "2026-12-04T10:00:00Z", 300, "2026-12-07T08:00:00Z"),
        # every window shorter than what is needed: use them as they are
        ([SHORT], "2026-12-07T09:05:00Z", 3600, "2026-12-07T09:05:00Z"),
        ([SHORT], "2026-12-07T10:00:00Z", 3600, "2026-12-14T09:00:00Z"),
        # the short one would be first, but the long one fits
        ([SHORT, OFFICE], "2026-12-06T12:00:00Z", 3600, "2026-12-07T08:00:00Z"),
        # a whole-day window every day: open at 23:19 with an hour needed (the next
        # day's occurrence continues it), DST night included
        ([ALWAYS_BERLIN], "2026-12-02T22:19:00Z", 3600, "2026-12-02T22:19:00Z"),
        ([ALWAYS_BERLIN], "2026-03-28T22:30:00Z", 7200, "2026-03-28T22:30:00Z"),
        # two hours of Saturday night only with Sunday's early hours
        ([SAT_LATE], "2026-12-05T23:30:00Z", 3600, "2026-12-12T22:00:00Z"),
        ([SAT_LATE, SUN_EARLY], "2026-12-05T23:30:00Z", 3600, "2026-12-05T23:30:00Z"),
        # the next long-enough stretch is made of two windows
        ([SAT_LATE, SUN_EARLY], "2026-12-06T03:30:00Z", 7200, "2026-12-12T22:00:00Z"),
    ],
)
def test_start_time(ws: list[Window], now: str, need: int, expected: str) -> None:
    assert gate.start_time(ws, z(now), need) == z(expected)


def test_window_hold_says_when() -> None:
    assert gate.window_hold([OFFICE], z("2026-12-02T10:00:00Z"), 300) is None
    h = gate.window_hold([OFFICE], z("2026-12-04T10:00:00Z"), 300)
    assert h is not None and h.kind == gate.WAITING_FOR_WINDOW
    assert h.until == z("2026-12-07T08:00:00Z")
    assert "2026-12-07T08:00:00" in h.detail and "Europe/Berlin" in h.detail


def test_without_start_keeps_what_finished() -> None:
    d = rollout.Decision(
        batch_status={0: BatchStatus.SUCCEEDED, 1: BatchStatus.DEPLOYING},
        start_batch=1,
        events=[rollout.Event("batch-succeeded", 0), rollout.Event("batch-started", 1)],
    )
    out = gate.without_start(d)
    assert out.start_batch is None
    assert out.batch_status == {0: BatchStatus.SUCCEEDED}
    assert [e.kind for e in out.events] == ["batch-succeeded"]
    assert gate.without_start(rollout.Decision()) == rollout.Decision()


@pytest.mark.parametrize(
    ("before", "after", "kinds"),
    [
        ((None, None), None, []),
        (
            (None, None),
            gate.Hold("waiting-for-window", "next at x"),
            ["rollout-waiting-for-window"],
        ),
        (("waiting-for-window", "next at x"), gate.Hold("waiting-for-window", "next at x"), []),
        (("waiting-for-window", "next at x"), None, ["rollout-hold-cleared"]),
        (
            ("held-by-budget", "disruption budget [db] (1 in flight)"),
            gate.Hold("held-by-budget", "disruption budget [db] (0 in flight)"),
            [],
        ),
        (
            ("held-by-budget", "disruption budget [db] (1 in flight)"),
            gate.Hold("held-by-budget", "max_unavailable 2 (2 of 10)"),
            ["rollout-held-by-budget"],
        ),
        (
            ("held-by-budget", "x"),
            gate.Hold("waiting-for-window", "y"),
            ["rollout-waiting-for-window"],
        ),
    ],
)
def test_hold_events_only_on_change(
    before: tuple[str | None, str | None], after: gate.Hold | None, kinds: list[str]
) -> None:
    assert [e.kind for e in gate.hold_events(before, after, 1)] == kinds
