"""The cyclic garbage collector paused while a million objects are made at once.

A parsed 100,000-machine status (client) and the report cache's view of every
machine (api.report_cache) are trees that reference counting frees; while they are
built, their allocations set off collections that walk them again and again
(docs/performance.md: the parse ~0.77 s with them, ~0.39 s without; the view's load
~20 % of its CPU).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside; the collector as it was afterwards (on or off)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
