"""Coordinated reboots on the agent side (DESIGN §11): observe, lease, reboot, release.

The agent reads the booted system's and the current system's kernel, initrd and
kernel-modules links (the comparison is nixfleet.policy.reboot's, as autoUpgrade
does it) and reports `needs_reboot` and `booted_generation`. When the control plane
says the machine's rollout reboots (`reboot: when-needed`), it takes a reboot lease
(POST /api/v1/machines/{id}/reboot-lease), remembers that in its state dir, and runs
the reboot command through nixfleet.process. Once the machine runs healthy on its
booted generation it gives the lease back (DELETE). The lease file makes the
release survive the reboot; the control plane's expiry covers a machine that never
comes back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nixfleet import nix, process, wire
from nixfleet.client import Client
from nixfleet.errors import CommandError, ConflictError, NixfleetError
from nixfleet.models import STORE_PATH_RE, isoformat, utcnow
from nixfleet.policy.reboot import changed_links, needs_reboot

log = logging.getLogger(__name__)

LEASE_FILE = "reboot-lease.json"
DEFAULT_REBOOT_COMMAND = ("systemctl", "reboot")
REBOOT_TIMEOUT = 60.0


@dataclass(frozen=True)
class BootState:
    booted_generation: str | None
    needs_reboot: bool
    changed: tuple[str, ...] = ()

    def report_fields(self) -> wire.BootFields:
        """The report body's §11 fields."""
        out: wire.BootFields = {"needs_reboot": self.needs_reboot}
        if self.booted_generation is not None:
            out["booted_generation"] = self.booted_generation
        return out


def observe(booted_system: str | Path, current_system: str | Path) -> BootState:
    """What the machine booted, and whether the current system needs a reboot to run."""
    booted = None
    if os.path.lexists(booted_system):
        target = os.path.realpath(booted_system)
        booted = target if STORE_PATH_RE.match(target) else None
    if booted is None or not os.path.lexists(current_system):
        # Nothing booted from the store (a container, a test host): no reboot can help.
        return BootState(booted, False)
    old, new = nix.boot_links(booted_system), nix.boot_links(current_system)
    return BootState(booted, needs_reboot(old, new), tuple(changed_links(old, new)))


class Rebooter:
    """The lease and the reboot, with the held lease remembered in the state dir."""

    def __init__(
        self,
        machine_id: str,
        state_dir: str | Path,
        command: Sequence[str] = DEFAULT_REBOOT_COMMAND,
    ) -> None:
        self.machine_id = machine_id
        self.file = Path(state_dir) / LEASE_FILE
        self.command = tuple(command)

    def holding(self) -> wire.JSONObject | None:
        """The lease this machine took and has not given back ({generation, taken_at})."""
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _remember(self, generation: str) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"generation": generation, "taken_at": isoformat(utcnow())}))
        os.replace(tmp, self.file)

    def _forget(self) -> None:
        self.file.unlink(missing_ok=True)

    def step(
        self,
        client: Client,
        boot: BootState,
        current: str | None,
        desired: str | None,
        *,
        wanted: bool,
        healthy: bool,
    ) -> str:
        """One cycle's reboot decision; returns what it did (for the log and tests).

        - holding a lease, booted into the current system and healthy: release it;
        - the current system is the desired one, needs a reboot, the CP wants
          reboots, health passed: take a lease; granted -> reboot.
        """
        if self.holding() is not None:
            if not boot.needs_reboot and healthy:
                try:
                    client.release_reboot_lease(self.machine_id)
                except NixfleetError as e:
                    log.warning("could not release the reboot lease yet: %s", e)
                    return "release-failed"
                self._forget()
                log.info("healthy on booted generation %s: reboot lease released", current)
                return "released"
            if not boot.needs_reboot:
                return "holding"
        if not (wanted and boot.needs_reboot and healthy and current and current == desired):
            return "none"
        try:
            client.take_reboot_lease(self.machine_id)
        except ConflictError as e:
            log.info("no reboot lease yet: %s", e.detail)
            return "waiting"
        self._remember(current)
        log.info(
            "reboot lease taken; rebooting into %s (%s changed)", current, ", ".join(boot.changed)
        )
        try:
            process.run(self.command, timeout=REBOOT_TIMEOUT)
        except CommandError as e:
            # Keep the lease file: the next cycle retries the reboot under the same lease
            # (recursive take), and the CP's expiry bounds how long that may go on.
            log.error("reboot command failed: %s", e)
            return "reboot-failed"
        return "rebooting"
