"""Does a machine need a reboot? Pure: the agent reads the links, this compares them.

NixOS's `system.autoUpgrade` (allowReboot) reboots when
`readlink /run/booted-system/{initrd,kernel,kernel-modules}` differs from the same
three links of the new system; anything else a switch can apply live. Here the same
comparison, over what the agent read (None for a link that is missing).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

BOOT_LINKS = ("initrd", "kernel", "kernel-modules")


class RebootPolicy(StrEnum):
    NEVER = "never"
    WHEN_NEEDED = "when-needed"


def needs_reboot(booted: Mapping[str, str | None], current: Mapping[str, str | None]) -> bool:
    """True when the booted system's kernel, initrd or kernel modules are not the current's.

    A system without any of the three links (a container, a test fixture) on both
    sides never needs a reboot; one side missing a link the other has does.
    """
    return any(booted.get(name) != current.get(name) for name in BOOT_LINKS)


def changed_links(booted: Mapping[str, str | None], current: Mapping[str, str | None]) -> list[str]:
    """Which of the three differ (for the message an operator reads)."""
    return [name for name in BOOT_LINKS if booted.get(name) != current.get(name)]
