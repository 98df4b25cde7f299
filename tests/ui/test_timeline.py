"""The machine page's history timeline pages back on the server ("older", htmx)."""

from __future__ import annotations

import re

from conftest import ControlPlane

from nixfleet.ui.machine import RECENT
from ui.test_pages import logged_in

MINUS = "\N{MINUS SIGN}"  # how the timeline writes a removed tag


def test_the_timeline_pages_back_to_the_first_event(control_plane: ControlPlane) -> None:
    cp = control_plane
    client = cp.client()
    client.register_machine("hist-01", [])
    n = RECENT // 2 + 10  # 2n events: a tag added, then removed
    for i in range(n):
        client.add_tags("hist-01", [f"t{i:03}"])
        client.remove_tags("hist-01", [f"t{i:03}"])
    every = [e for i in range(n) for e in (f"+t{i:03}", f"{MINUS}t{i:03}")]
    b = logged_in(cp, cp.admin_key)
    page = b.get("/ui/machines/hist-01")
    assert page.status == 200
    shown = re.findall(rf"[+{MINUS}]t\d{{3}}", page.text)
    assert shown == every[::-1][:RECENT]  # newest first, one page
    older = re.search(r'hx-get="([^"]+part=timeline&amp;before=\d+)"', page.text)
    assert older, "no older link"
    seen = list(shown)
    while older:
        part = b.get(older.group(1).replace("&amp;", "&"))
        assert part.status == 200 and "<html" not in part.text  # only the items
        seen += re.findall(rf"[+{MINUS}]t\d{{3}}", part.text)
        older = re.search(r'hx-get="([^"]+part=timeline&amp;before=\d+)"', part.text)
    assert seen == every[::-1]  # each event once, in order, back to the first
    # Without htmx the same link is a whole page.
    plain = re.search(r'href="(/ui/machines/hist-01\?before=\d+)', page.text)
    assert plain and b.get(plain.group(1)).status == 200
    assert b.get("/ui/machines/hist-01?before=nope").status == 422
