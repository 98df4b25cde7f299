"""Which machines an operator asked for: the one filter spec of status, list and dashboard.

`parse` turns the texts an operator typed (CLI options, an API query string, the
dashboard's form) into a `MachineFilter`, once, refusing a bad value with the value
and the allowed ones (CLI exit 2, API 422) — never an empty result. The SQL that
applies it is store.status.filter_sql; sync, health and stale mean what
models.sync_of / health_of / is_stale say.
"""

from __future__ import annotations

from dataclasses import dataclass

from nixfleet.errors import FieldError, ValidationError
from nixfleet.models import TAG_RE, Health, Lifecycle, Sync

# Sort keys (every order ends with the host, so pages are stable).
SORT_KEYS = ("host", "last-report", "sync", "lifecycle", "health")
HOST_MAX = 128
TAGS_MAX = 1024
TAGS_HELP = (
    "comma-separated tags (letters, digits, . _ : -), a leading ! excludes, e.g. prod,!canary"
)
STALE_WORDS = {"true": True, "yes": True, "false": False, "no": False}


@dataclass(frozen=True)
class MachineFilter:
    tags: tuple[str, ...] = ()  # carrying all of these
    not_tags: tuple[str, ...] = ()  # carrying none of these
    lifecycle: Lifecycle | None = None
    sync: Sync | None = None
    health: Health | None = None
    stale: bool | None = None
    search: str = ""  # a case-insensitive substring of the host, or a glob with * ? [
    sort: str = "host"
    descending: bool = False

    @property
    def selects_some(self) -> bool:
        """Whether it leaves machines out (an order alone selects every machine)."""
        return self != MachineFilter(sort=self.sort, descending=self.descending)


def sync_word(s: Sync) -> str:
    """The spelling of a sync value on a command line: `in-sync`, `no-desired`."""
    return s.value.replace(" ", "-")


def _bad(name: str, value: str, allowed: str) -> ValidationError:
    return ValidationError(
        f"invalid {name} {value[:64]!r}: allowed {allowed}",
        errors=[FieldError(name, f"{value[:64]!r} is not one of: {allowed}")],
    )


def parse_tags(text: str, name: str = "tags") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`prod,!canary` → (carrying prod, not carrying canary); spaces around commas ignored."""
    if len(text) > TAGS_MAX:
        raise _bad(name, text, f"at most {TAGS_MAX} characters")
    wanted: list[str] = []
    unwanted: list[str] = []
    for raw in text.replace(" ", ",").split(","):
        if not raw:
            continue
        negated = raw.startswith("!")
        tag = raw[1:] if negated else raw
        if not TAG_RE.match(tag):
            raise _bad(name, tag, TAGS_HELP)
        (unwanted if negated else wanted).append(tag)
    return tuple(wanted), tuple(unwanted)


def parse_lifecycle(text: str | None, name: str = "lifecycle") -> Lifecycle | None:
    if not text:
        return None
    try:
        return Lifecycle(text)
    except ValueError:
        raise _bad(name, text, ", ".join(Lifecycle)) from None


def parse_sync(text: str | None, name: str = "sync") -> Sync | None:
    """`in-sync` or `in sync` (the stored value) alike."""
    if not text:
        return None
    try:
        return Sync(text.replace("-", " "))
    except ValueError:
        raise _bad(name, text, ", ".join(sync_word(s) for s in Sync)) from None


def parse_health(text: str | None, name: str = "health") -> Health | None:
    if not text:
        return None
    try:
        return Health(text)
    except ValueError:
        raise _bad(name, text, ", ".join(Health)) from None


def parse_stale(text: str | None, name: str = "stale") -> bool | None:
    if not text:
        return None
    if text not in STALE_WORDS:
        raise _bad(name, text, "true, false")
    return STALE_WORDS[text]


def parse_host(text: str | None, name: str = "host") -> str:
    search = (text or "").strip()
    if len(search) > HOST_MAX or any(ord(c) < 32 for c in search):
        raise _bad(name, search, f"a host name or glob of at most {HOST_MAX} printable characters")
    return search


def parse_sort(text: str | None, name: str = "sort") -> str:
    if not text:
        return "host"
    if text not in SORT_KEYS:
        raise _bad(name, text, ", ".join(SORT_KEYS))
    return text


def parse(
    *,
    tags: str = "",
    lifecycle: str | None = None,
    sync: str | None = None,
    health: str | None = None,
    stale: str | None = None,
    host: str | None = None,
    sort: str | None = None,
    descending: bool = False,
    names: dict[str, str] | None = None,
) -> MachineFilter:
    """The filter the texts name; `names` renames fields in errors (the dashboard's `q`)."""
    n = {k: k for k in ("tags", "lifecycle", "sync", "health", "stale", "host", "sort")}
    n.update(names or {})
    wanted, unwanted = parse_tags(tags, n["tags"])
    return MachineFilter(
        tags=wanted,
        not_tags=unwanted,
        lifecycle=parse_lifecycle(lifecycle, n["lifecycle"]),
        sync=parse_sync(sync, n["sync"]),
        health=parse_health(health, n["health"]),
        stale=parse_stale(stale, n["stale"]),
        search=parse_host(host, n["host"]),
        sort=parse_sort(sort, n["sort"]),
        descending=descending,
    )
