"""Reboot leases: at most N machines of a tag group rebooting at once (DESIGN §11). Pure.

After the FleetLock protocol (Zincati's lock server): each group is a semaphore with
`slots` slots; a machine takes one before it reboots and gives it back once it runs
healthy on its new booted generation. Taking is recursive (a holder asking again is
granted the lease it has, unchanged, so an agent that lost the answer may ask again)
and a lease is owned by its machine (releasing one it does not hold is a no-op that
succeeds). Unlike FleetLock, a lease expires: a machine that never comes back
cannot hold the fleet; the reconciler turns an expired lease into a failed machine
and frees the slot.

A machine belongs to every group whose tags it carries all of, and takes a slot in
each, all or nothing; a machine in no group uses the `default` group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from nixfleet.errors import FieldError
from nixfleet.models import TAG_RE
from nixfleet.policy import taggroups

DEFAULT_GROUP = "default"


@dataclass(frozen=True)
class Group:
    name: str
    slots: int
    tags: tuple[str, ...] = ()  # () only for the default group

    def matches(self, tags: Iterable[str]) -> bool:
        return bool(self.tags) and taggroups.selects(self.tags, tags)


@dataclass(frozen=True)
class Lease:
    group: str
    machine_id: str
    acquired_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class Taken:
    granted: bool
    leases: tuple[Lease, ...]  # the machine's leases after the call (new or kept)
    new: tuple[Lease, ...]  # what to insert (empty on a recursive take)
    full: tuple[str, ...] = ()  # groups without a free slot when not granted
    holders: Mapping[str, tuple[str, ...]] | None = None  # group -> machines holding it


def groups_for(tags: Iterable[str], groups: Sequence[Group], default_slots: int) -> list[Group]:
    """The groups a machine with `tags` takes a slot in (the default group if none)."""
    tag_set = set(tags)
    mine = [g for g in groups if g.matches(tag_set)]
    return mine or [Group(DEFAULT_GROUP, default_slots)]


def live(leases: Iterable[Lease], now: datetime) -> list[Lease]:
    return [lease for lease in leases if lease.expires_at > now]


def expired(leases: Iterable[Lease], now: datetime) -> list[Lease]:
    return [lease for lease in leases if lease.expires_at <= now]


def take(
    machine_id: str,
    mine: Sequence[Group],
    held: Sequence[Lease],
    now: datetime,
    ttl: int,
) -> Taken:
    """Grant `machine_id` a slot in each of its groups, or nothing.

    `held` are the live leases of those groups (expired ones are the reconciler's to
    turn into failures, and hold no slot).
    """
    current = [lease for lease in live(held, now) if lease.machine_id == machine_id]
    have = {lease.group for lease in current}
    if have >= {g.name for g in mine}:
        return Taken(True, tuple(current), ())
    holders: dict[str, list[str]] = {}
    for lease in live(held, now):
        holders.setdefault(lease.group, []).append(lease.machine_id)
    full = tuple(
        g.name for g in mine if g.name not in have and len(holders.get(g.name, ())) >= g.slots
    )
    if full:
        return Taken(
            False,
            tuple(current),
            (),
            full,
            {g: tuple(sorted(holders.get(g, ()))) for g in full},
        )
    until = now + timedelta(seconds=ttl)
    new = tuple(Lease(g.name, machine_id, now, until) for g in mine if g.name not in have)
    return Taken(True, (*current, *new), new)


def release(machine_id: str, held: Sequence[Lease]) -> list[Lease]:
    """The leases to drop: the machine's own, whatever their state (none is fine)."""
    return [lease for lease in held if lease.machine_id == machine_id]


# --- settings -----------------------------------------------------------------------


def parse_groups(items: Sequence[Mapping[str, Any]] | None) -> tuple[Group, ...]:
    return tuple(
        Group(
            str(i.get("name") or "+".join(sorted(set(i["tags"])))),
            int(i["slots"]),
            tuple(sorted(set(i["tags"]))),
        )
        for i in items or ()
    )


def group_errors(items: Any, field: str = "reboot_groups") -> list[FieldError]:
    """Field errors of the settings' `reboot_groups`: [{tags, slots, name?}]."""
    out: list[FieldError] = []
    if items is None:
        return out
    names: set[str] = set()
    shape = "{tags: [...], slots: N}"
    for where, item in taggroups.entries(items, field, shape, ("tags", "slots", "name"), out):
        tags = item.get("tags", [])
        if not taggroups.check_tags(
            out, where, tags, "must be a non-empty list of tags, e.g. [db]"
        ):
            continue
        taggroups.check_count(out, where, item, "slots")
        name = item.get("name") or "+".join(sorted(set(tags)))
        if not isinstance(name, str) or not TAG_RE.match(name) or name == DEFAULT_GROUP:
            out.append(FieldError(f"{where}.name", "must be a tag-like name other than 'default'"))
        elif name in names:
            out.append(FieldError(f"{where}.name", f"{name!r} is used twice; names are unique"))
        names.add(str(name))
    return out
