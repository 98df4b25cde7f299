"""Maintenance windows: when a batch may start (DESIGN §11). Pure: callers pass `now`.

A window is a weekly recurring stretch of local wall-clock time in an IANA zone:
`{days: [mon, tue], start: "09:00", end: "16:00", timezone: Europe/Berlin}`. `days`
are the days a window *opens* on, so `{days: [fri], start: "22:00", end: "02:00"}`
runs from Friday 22:00 to Saturday 02:00. `end` may be "24:00" (the end of the day).

Each occurrence is turned into an interval of instants, [open, close). A wall time
that does not exist (the hour skipped when clocks go forward) resolves to the first
instant after the gap; a wall time that happens twice (the hour repeated when clocks
go back) resolves to its first occurrence. So an occurrence is always one contiguous
interval, its real length may be an hour shorter or longer than its wall-clock
length on DST days, and "the next window start" is always a real instant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nixfleet.errors import FieldError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TIME_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$|^24:00$")
ALL_DAYS = frozenset(range(7))


@dataclass(frozen=True)
class Window:
    """One weekly window; `start`/`end` are minutes after local midnight (end ≤ 1440)."""

    days: frozenset[int]  # 0 = Monday, as date.weekday()
    start: int
    end: int
    timezone: str = "UTC"

    @property
    def crosses_midnight(self) -> bool:
        return self.end <= self.start

    def label(self) -> str:
        days = (
            "every day" if self.days == ALL_DAYS else ",".join(DAYS[d] for d in sorted(self.days))
        )
        return f"{days} {_hhmm(self.start)}-{_hhmm(self.end)} {self.timezone}"

    def occurrence(self, day: date) -> tuple[datetime, datetime] | None:
        """The [open, close) instants (UTC) of the occurrence opening on local `day`."""
        if day.weekday() not in self.days:
            return None
        zone = ZoneInfo(self.timezone)
        end_day = day + timedelta(days=1) if self.crosses_midnight else day
        return _instant(day, self.start, zone), _instant(end_day, self.end, zone)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def _instant(day: date, minutes: int, zone: ZoneInfo) -> datetime:
    """The first instant (UTC) at which the wall clock of `zone` reads ≥ day + minutes."""
    day = day + timedelta(days=minutes // 1440)
    minutes %= 1440
    naive = datetime.combine(day, time(minutes // 60, minutes % 60))
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        # Exists. In a repeated hour fold=0 is the earlier of the two instants.
        return first
    # In a gap: fold=0 used the offset before the jump (too late), fold=1 the one
    # after (too early). The jump is between them; find it to the second.
    lo = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    hi = first
    lo, hi = min(lo, hi), max(lo, hi)
    while (hi - lo) > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(zone).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0) if hi.microsecond else hi


def _occurrences_around(
    w: Window, now: datetime, days_ahead: int
) -> Iterable[tuple[datetime, datetime]]:
    local = now.astimezone(ZoneInfo(w.timezone)).date()
    for offset in range(-1, days_ahead + 1):
        occ = w.occurrence(local + timedelta(days=offset))
        if occ is not None:
            yield occ


def intervals(
    windows: Sequence[Window], now: datetime, days_ahead: int = 8
) -> list[tuple[datetime, datetime]]:
    """The windows' open stretches from a day before `now` to `days_ahead` after, in order.

    Occurrences that overlap or touch are one stretch: `every day 00:00-24:00` is open
    without a break, and `fri 22:00-24:00` with `sat 00:00-06:00` is one night. Empty
    occurrences (a wall-clock stretch skipped by DST) are left out.
    """
    found = sorted(
        occ for w in windows for occ in _occurrences_around(w, now, days_ahead) if occ[0] < occ[1]
    )
    merged: list[tuple[datetime, datetime]] = []
    for start, end in found:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def current(windows: Sequence[Window], now: datetime) -> tuple[datetime, datetime] | None:
    """The open stretch containing `now` (occurrences that touch taken together), if any."""
    return next((s for s in intervals(windows, now) if s[0] <= now < s[1]), None)


def is_open(windows: Sequence[Window], now: datetime) -> bool:
    """No windows means always open; otherwise `now` must fall inside one of them."""
    return not windows or current(windows, now) is not None


def next_open(windows: Sequence[Window], now: datetime) -> datetime | None:
    """When a batch may start: `now` if open, else the next window's opening instant.

    None only when `windows` is empty-but-never-open, which validation prevents
    (every window has at least one day); an empty list means "now".
    """
    if is_open(windows, now):
        return now
    # A week, and a day each side.
    return next((start for start, _end in intervals(windows, now) if start > now), None)


# --- documents ----------------------------------------------------------------------


def from_document(item: Mapping[str, Any]) -> Window:
    """A Window from one validated `windows:` item (see `errors`)."""
    days = item.get("days")
    return Window(
        days=frozenset(DAYS.index(d) for d in days) if days else ALL_DAYS,
        start=_minutes(item["start"]),
        end=_minutes(item["end"]),
        timezone=item.get("timezone", "UTC"),
    )


def parse(items: Sequence[Mapping[str, Any]] | None) -> tuple[Window, ...]:
    return tuple(from_document(i) for i in items or ())


def errors(items: Any, field: str = "windows") -> list[FieldError]:
    """What the JSON Schema cannot say: the zone exists, start and end differ.

    The schema has checked the shapes; this runs only on what it accepted.
    """
    out: list[FieldError] = []
    if not isinstance(items, list):
        return out
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            continue
        where = f"{field}[{i}]"
        zone = item.get("timezone", "UTC")
        if isinstance(zone, str):
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                out.append(
                    FieldError(
                        f"{where}.timezone",
                        f"{zone!r} is not an IANA time zone; use a name like "
                        "Europe/Berlin, America/New_York or UTC",
                    )
                )
        start, end = item.get("start"), item.get("end")
        if isinstance(start, str) and isinstance(end, str) and _same(start, end):
            out.append(
                FieldError(
                    f"{where}.end",
                    f"equals start ({start}); for a whole day use start 00:00 and end 24:00",
                )
            )
        if start == "24:00":
            out.append(FieldError(f"{where}.start", "24:00 is only an end; start at 00:00"))
    return out


def _same(start: str, end: str) -> bool:
    if not (TIME_RE.match(start) and TIME_RE.match(end)):
        return False
    return _minutes(start) == _minutes(end)
