"""How machine events are stored (DESIGN §3 History, migration 0017 and 0024): each
stored form with its SQL form, held to each other by tests/store/test_history.py.

store.history writes and reads events in these forms; migrations and the benchmarks'
database builders use them too, so they live apart from the queries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from nixfleet.history import EventKind
from nixfleet.wire import JSONObject

# The stored code of each kind: the rows of event_kinds (migration 0017). Codes never
# change once shipped; a new kind takes the next code (and a migration adds its row).
KIND_CODES: dict[EventKind, int] = {
    EventKind.DESIRED: 0,
    EventKind.GENERATION: 1,
    EventKind.HEALTH: 2,
    EventKind.DEPLOYMENT_FAILED: 3,
    EventKind.ROLLED_BACK: 4,
    EventKind.TAGS: 5,
    EventKind.LIFECYCLE: 6,
    EventKind.REBOOT_NEEDED: 7,
    EventKind.REBOOTED: 8,
}
KINDS = {code: kind for kind, code in KIND_CODES.items()}
AGENT, OPERATOR = 1, 2  # the first rows of event_sources

# A detail with exactly these keys, in this order (or a prefix of them), is stored as
# the array of its values; any other detail as its JSON object.
DETAIL_KEYS: dict[EventKind, tuple[str, ...]] = {
    EventKind.HEALTH: ("status", "previous", "failing", "newly_failing", "recovered"),
    EventKind.TAGS: ("tag_source", "added", "removed"),
    EventKind.LIFECYCLE: ("from", "to", "reason"),
    EventKind.DEPLOYMENT_FAILED: ("reason",),
    EventKind.ROLLED_BACK: ("reason",),
    EventKind.REBOOT_NEEDED: ("booted",),
    EventKind.REBOOTED: ("previous",),
}

# --- the stored forms, each with its SQL form (held to each other by tests) -------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PREFIX, _SYSTEM, _MARK, _HOST = "/nix/store/", "-nixos-system-", "\x01", "\x02"


def micros(ts: datetime) -> int:
    """A time as stored in machine_events.at: microseconds since 1970 UTC (exact)."""
    return (ts - _EPOCH) // timedelta(microseconds=1)


def from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def micros_sql(text: str, *, postgresql: bool = False) -> str:
    """SQL: a stored time text (models.TIME_FORMAT) as micros."""
    if postgresql:
        return (
            f"(extract(epoch FROM CAST(substr({text}, 1, 19) AS timestamp))::bigint * 1000000 "
            f"+ CAST(substr({text}, 21, 6) AS INTEGER))"
        )
    return f"(unixepoch(substr({text}, 1, 19)) * 1000000 + CAST(substr({text}, 21, 6) AS INTEGER))"


def system_name(machine_id: str) -> str:
    """The machine's system name as NixOS puts it in its paths: the id's first DNS label
    (networking.hostName, without networking.domain)."""
    return machine_id.split(".", 1)[0]


def _label_sql(machine_id: str, postgresql: bool) -> str:
    if postgresql:
        return f"split_part({machine_id}, '.', 1)"
    return f"substr({machine_id}, 1, instr({machine_id} || '.', '.') - 1)"


def encode_path(path: str, machine_id: str) -> str:
    """The stored form of one of `machine_id`'s store paths; any other text is kept as it is.

    "-nixos-system-<its name>-" (in every system path of that machine) becomes one byte, any
    other "-nixos-system-" another. Encoded forms never start with "/", so decode tells
    them apart from kept ones.
    """
    rest = path[len(_PREFIX) :]
    if (
        path.startswith(_PREFIX)
        and rest[:1] not in ("/", "")
        and _MARK not in path
        and _HOST not in path
    ):
        return rest.replace(f"{_SYSTEM}{system_name(machine_id)}-", _HOST).replace(_SYSTEM, _MARK)
    return path


def decode_path(stored: str, machine_id: str) -> str:
    if stored.startswith("/"):
        return stored
    host = f"{_SYSTEM}{system_name(machine_id)}-"
    return _PREFIX + stored.replace(_MARK, _SYSTEM).replace(_HOST, host)


def encode_path_sql(path: str, machine_id: str, *, postgresql: bool = False) -> str:
    """SQL: encode_path of the text `path` for the machine whose id is the expression
    `machine_id` (NULL stays NULL)."""
    host = f"'-nixos-system-' || {_label_sql(machine_id, postgresql)} || '-'"
    instr, char = ("strpos", "chr") if postgresql else ("instr", "char")
    return (
        f"CASE WHEN substr({path}, 1, 11) = '/nix/store/' AND substr({path}, 12, 1) <> '/' "
        f"AND length({path}) > 11 AND {instr}({path}, {char}(1)) = 0 "
        f"AND {instr}({path}, {char}(2)) = 0 THEN replace(replace(substr({path}, 12), {host}, "
        f"{char}(2)), '-nixos-system-', {char}(1)) ELSE {path} END"
    )


def encode_detail(kind: EventKind, detail: Mapping[str, Any]) -> str | None:
    if not detail:
        return None
    names = tuple(detail)
    if names == DETAIL_KEYS.get(kind, ())[: len(names)]:
        return json.dumps([detail[k] for k in names], separators=(",", ":"))
    return json.dumps(dict(detail), separators=(",", ":"))


def decode_detail(kind: EventKind, stored: str | None) -> JSONObject:
    if stored is None:
        return {}
    value = json.loads(stored)
    if isinstance(value, list):
        return dict(zip(DETAIL_KEYS[kind], value, strict=False))
    return dict(value)
