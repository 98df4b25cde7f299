"""Rows into the store's dataclasses, by column name (DESIGN rule 9: no positions).

`from_row` fills each field of a frozen dataclass from the column of the same name;
the fields a column cannot give as it is (JSON to decode, a column of another name,
a nested dataclass) are passed as keywords. One mapper, so a field added to a
dataclass is read by every query that selects its column.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from nixfleet.store.conn import Row

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def from_row(cls: type[T], row: Row, **given: Any) -> T:
    """A `cls` from `row`: each field the column of its name, unless `given`."""
    return cls(**{f.name: given[f.name] if f.name in given else row[f.name] for f in fields(cls)})
