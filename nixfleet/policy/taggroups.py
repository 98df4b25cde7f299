"""Tag groups of the policy settings (DESIGN §11): the one all-of selector and its checks.

`disruption_budgets`, `reboot_groups` and `default_windows` are each a list of
objects that select machines (or rollouts) by `tags`, all of them; `selects` is that
rule, and `entries`, `check_tags` and `check_count` check such a list the same way
for each, naming the field of every problem. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from nixfleet.errors import FieldError
from nixfleet.models import TAG_RE


def selects(selector: Iterable[str], tags: Iterable[str]) -> bool:
    """All of the selector's tags are among `tags` (an empty selector selects all)."""
    return set(selector) <= set(tags)


def entries(
    items: Any, field: str, shape: str, allowed: Iterable[str], out: list[FieldError]
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The objects of a settings list, each with where it sits (`field[i]`), in order.

    A value that is no list, an entry that is no object (both described by `shape`,
    e.g. `{tags: [...], slots: N}`) and the first unknown field of an entry are
    appended to `out` as the entries are reached (a generator: the caller's own
    errors of an entry follow its shape errors).
    """
    if not isinstance(items, list):
        out.append(FieldError(field, f"must be a list of {shape}"))
        return
    allowed = sorted(allowed)
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, Mapping):
            out.append(FieldError(where, f"must be an object {shape}"))
            continue
        extra = sorted(set(item) - set(allowed))
        if extra:
            out.append(
                FieldError(f"{where}.{extra[0]}", f"unknown field; allowed: {', '.join(allowed)}")
            )
        yield where, item


def check_tags(
    out: list[FieldError], where: str, tags: Any, message: str, *, empty: bool = False
) -> bool:
    """`where.tags` must be a list of tags (non-empty unless `empty`); False: appended."""
    if (
        isinstance(tags, list)
        and (empty or tags)
        and all(isinstance(t, str) and TAG_RE.match(t) for t in tags)
    ):
        return True
    out.append(FieldError(f"{where}.tags", message))
    return False


def check_count(out: list[FieldError], where: str, item: Mapping[str, Any], key: str) -> None:
    """`where.key` must be a positive integer (not a bool)."""
    n = item.get(key)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        out.append(FieldError(f"{where}.{key}", "must be a positive integer"))
