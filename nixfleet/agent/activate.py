"""Fetch, switch, health-check and roll back one generation.

The order matters for crash safety: the activation is recorded as in progress in the
state dir before the profile changes, and its outcome after. The agent only reads the
current-system link; the switch script moves it (as NixOS's activation moves
/run/current-system), which is why `NIXFLEET_CURRENT_SYSTEM` is passed to it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from nixfleet import nix, process
from nixfleet.agent import health as healthmod
from nixfleet.agent.config import AgentConfig
from nixfleet.agent.output import tail
from nixfleet.agent.state import AgentState, InProgress, Outcome, StateStore, now
from nixfleet.errors import CommandError, NixfleetError
from nixfleet.models import STORE_PATH_RE, HealthResult

log = logging.getLogger(__name__)

SWITCH_TIMEOUT = 1800.0
SWITCH_SCRIPT = "bin/switch-to-configuration"
MESSAGE_MAX = 1000
UNIT_POLL = 1.0


@dataclass(frozen=True)
class Result:
    """What one deployment attempt did; `changed` is False when the machine is untouched."""

    generation: str
    success: bool
    message: str
    changed: bool
    health: HealthResult | None = None
    output: str | None = None  # the tail of the switch's output (agent.output), on failure


def observe_current(config: AgentConfig) -> str | None:
    """The generation running now: where the current-system link points (None: none)."""
    link = config.current_system
    if not os.path.lexists(link):
        return None
    target = os.path.realpath(link)
    if not STORE_PATH_RE.match(target):
        log.warning("current system %s points at %s, not a store path", link, target)
        return None
    return target


def _profile_target(config: AgentConfig) -> str | None:
    return os.path.realpath(config.profile) if os.path.lexists(config.profile) else None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 3] + "..."


class Activator:
    """Performs activations for one machine; all state goes through `store`."""

    def __init__(
        self, config: AgentConfig, store: StateStore, stopping: Callable[[], bool] = lambda: False
    ) -> None:
        self.config = config
        self.store = store
        # True once the agent was asked to stop (SIGTERM): see deploy().
        self.stopping = stopping
        self.failed_output: str | None = None  # of the last failed switch
        self.switch_output: str | None = None  # of the deployment under way

    # --- fetch ---------------------------------------------------------------------

    def fetch(self, path: str, cache_url: str | None) -> None:
        """Make `path` valid in the local store; signatures are checked by nix copy."""
        if nix.is_valid(path):
            log.info("%s already in the store", path)
        elif cache_url:
            log.info("fetching %s from %s", path, cache_url)
            nix.copy_from(cache_url, [path], trusted_public_keys=self.config.trusted_public_keys)
        else:
            log.info("realising %s through the configured substituters", path)
            nix.realise([path])
        if not nix.is_valid(path):
            raise CommandError(f"{path} is still not in the store after fetching")
        if not os.access(Path(path) / SWITCH_SCRIPT, os.X_OK):
            raise CommandError(f"{path} is not a NixOS system: it has no {SWITCH_SCRIPT}")

    # --- switch --------------------------------------------------------------------

    def _switch_argv(self, path: str, unit: str | None) -> list[str]:
        script = str(Path(path) / SWITCH_SCRIPT)
        if unit is None:
            return [script, "switch"]
        # A transient unit outlives this process: a switch that restarts the agent's own
        # unit must not kill the switch (what nixos-rebuild-ng does too).
        argv = [
            "systemd-run",
            f"--unit={unit}",
            "--wait",
            "--collect",
            "--pipe",
            "--quiet",
            "--no-ask-password",
            "--service-type=exec",
            f"--setenv=NIXFLEET_CURRENT_SYSTEM={self.config.current_system}",
        ]
        for name in ("LOCALE_ARCHIVE", "NIXOS_INSTALL_BOOTLOADER"):
            if name in self.config.environ:
                argv.append(f"--setenv={name}={self.config.environ[name]}")
        return [*argv, script, "switch"]

    def switch(self, path: str, unit: str | None = None) -> str:
        """Run the switch; return its output (stdout and stderr interleaved).

        On failure the CommandError's detail has the output's last lines, and
        `failed_output` all of it, for the failing report (agent.output.tail).
        """
        env = self.config.child_env(NIXFLEET_CURRENT_SYSTEM=self.config.current_system)
        argv = self._switch_argv(path, unit)
        done = process.run(argv, env=env, timeout=SWITCH_TIMEOUT, check=False, merge_output=True)
        if done.returncode != 0:
            self.failed_output = done.stdout
            last = done.stdout.strip()[-process.STDERR_TAIL :]
            raise CommandError(f"{' '.join(argv[:3])} exited {done.returncode}: {last}")
        return done.stdout

    def _new_unit(self) -> str | None:
        if not self.config.use_systemd_run:
            return None
        return f"nixfleet-switch-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"

    # --- the whole thing -----------------------------------------------------------

    def plan(self, path: str, cache_url: str | None) -> str:
        """What deploy() would do, in one line (dry-run)."""
        source = f"from {cache_url}" if cache_url else "through the system's substituters"
        return (
            f"dry-run: would fetch {path} {source}, set profile {self.config.profile}, "
            f"run {SWITCH_SCRIPT} switch, run health checks"
        )

    def deploy(self, path: str, cache_url: str | None) -> Result:
        """Fetch, activate and check `path`; roll back on failure. Never raises."""
        if self.config.dry_run:
            return Result(path, True, self.plan(path, cache_url), changed=False)
        try:
            self.fetch(path, cache_url)
        except NixfleetError as e:
            msg = _short(f"fetch of {path} failed, nothing activated: {e.detail}")
            log.error("%s", msg)
            return Result(path, False, msg, changed=False)

        previous = observe_current(self.config)
        unit = self._new_unit()
        record = InProgress(
            generation=path,
            previous=previous,
            profile_previous=_profile_target(self.config),
            started_at=now(),
            unit=unit,
        )
        state = self.store.load()
        self.store.save(replace(state, in_progress=record))
        log.info("activating %s (previous: %s)", path, previous or "none")
        self.switch_output = self.failed_output = None
        try:
            nix.profile_set(self.config.profile, path)
            self.switch_output = self.switch(path, unit)
        except NixfleetError as e:
            if unit is not None and (self.stopping() or self._unit_running(unit)):
                return self._detached(record, unit, e.detail)
            self.switch_output = self.failed_output
            return self._rollback(record, f"switch to {path} failed: {e.detail}")
        return self._verify(record)

    def _detached(self, record: InProgress, unit: str, detail: str) -> Result:
        """`systemd-run --wait` failed, but not necessarily the switch in its unit:
        systemd stopping or restarting the agent sends SIGTERM to the whole agent
        cgroup, client included (which then dies when the switch ends, whatever its
        outcome). So while the agent is stopping, the activation stays recorded as
        in progress and the next agent concludes it (recover(): wait for the unit,
        check the current-system link and health). When the client died but the unit
        still runs otherwise, this agent waits for it and concludes the same way."""
        if self.stopping():
            log.warning(
                "stopping while %s still switches to %s (%s): the next start concludes it",
                unit,
                record.generation,
                detail,
            )
            return Result(
                record.generation,
                False,
                f"switch to {record.generation} still running in {unit}; the agent stopped",
                changed=True,
            )
        log.warning("lost the client of switch unit %s (%s); waiting for the unit", unit, detail)
        self._wait_for_unit(unit)
        return self._verify(record)

    def _unit_running(self, unit: str) -> bool:
        try:
            done = process.run(["systemctl", "is-active", unit], timeout=30, check=False)
        except NixfleetError:
            return False
        return done.stdout.strip() in ("active", "activating", "deactivating", "reloading")

    def _verify(self, record: InProgress) -> Result:
        """After a switch: the link must point at the new system and health must pass."""
        current = observe_current(self.config)
        if current != record.generation:
            return self._rollback(
                record,
                f"after switching, {self.config.current_system} points at {current or 'nothing'},"
                f" not {record.generation}",
            )
        result = healthmod.run_configured(self.config)
        if not result.all_passed:
            return self._rollback(
                record, f"health checks failed: {healthmod.failures(result)}", result
            )
        return self._finish(record, True, f"deployed {record.generation}", result)

    def _rollback(
        self, record: InProgress, reason: str, result: HealthResult | None = None
    ) -> Result:
        log.error("activation of %s failed: %s", record.generation, reason)
        if record.previous is None:
            try:
                if record.profile_previous:
                    nix.profile_set(self.config.profile, record.profile_previous)
            except NixfleetError as e:
                log.error("could not restore the profile: %s", e)
            return self._finish(
                record, False, f"no previous generation to roll back to: {reason}", result
            )
        try:
            # `nix-env --rollback` when the profile's previous generation is what ran
            # (nixos-rebuild --rollback); otherwise point the profile at it explicitly.
            target = _profile_target(self.config)
            if target == record.previous:
                pass  # the profile never moved (nix-env --set itself failed)
            elif record.profile_previous == record.previous and target == record.generation:
                nix.profile_rollback(self.config.profile)
            else:
                nix.profile_set(self.config.profile, record.previous)
            self.switch(record.previous, self._new_unit())
        except NixfleetError as e:
            return self._finish(
                record,
                False,
                f"rollback to {record.previous} failed ({e.detail}) after: {reason}",
                result,
            )
        log.warning("rolled back to %s", record.previous)
        return self._finish(record, False, f"rolled back: {reason}", result)

    def _finish(
        self, record: InProgress, success: bool, message: str, result: HealthResult | None
    ) -> Result:
        message = _short(message)
        output = None if success or self.switch_output is None else tail(self.switch_output)
        self.switch_output = None
        outcome = Outcome(record.generation, success, message, now(), record.previous, output)
        state: AgentState = self.store.load()
        state = replace(state, in_progress=None, last_outcome=outcome)
        if not success:
            state = state.with_failure(record.generation, message, outcome.at)
        self.store.save(state)
        return Result(
            record.generation, success, message, changed=True, health=result, output=output
        )

    def roll_back(self, generation: str, previous: str, reason: str) -> Result:
        """Back from a concluded, successful activation of `generation` (the confirm window).

        Recorded as in progress first, so an agent restarted during it rolls back again.
        """
        record = InProgress(generation, previous, None, now(), None)
        self.store.save(replace(self.store.load(), in_progress=record))
        return self._rollback(record, reason)

    # --- restart recovery ----------------------------------------------------------

    def _wait_for_unit(self, unit: str) -> None:
        """A switch in its transient unit may still run after the agent was restarted."""
        deadline = time.monotonic() + SWITCH_TIMEOUT
        while time.monotonic() < deadline:
            if not self._unit_running(unit):
                return
            log.info("switch unit %s still running; waiting", unit)
            time.sleep(UNIT_POLL)

    def recover(self) -> Result | None:
        """Finish an activation an earlier agent process started but never concluded."""
        record = self.store.load().in_progress
        if record is None or self.config.dry_run:
            return None
        log.warning(
            "found unfinished activation of %s from %s", record.generation, record.started_at
        )
        if record.unit:
            try:
                self._wait_for_unit(record.unit)
            except NixfleetError as e:
                log.error("could not query switch unit %s: %s", record.unit, e)
        if observe_current(self.config) == record.generation:
            return self._verify(record)
        return self._rollback(
            record, f"activation of {record.generation} was interrupted (agent restarted)"
        )
