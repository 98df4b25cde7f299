"""The agent's level-triggered loop: observe, report, converge, sleep.

Each cycle acts on the state it observes now (current-system link, state dir, the
CP's answer), never on what changed since the last one, so a missed poll, a restart
or a CP outage costs nothing but time. A generation that failed here is not retried
until the desired generation changes or an operator asks (`retry_requested_at`).
"""

from __future__ import annotations

import enum
import logging
import os
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

from nixfleet import __version__, schemas, wire
from nixfleet.agent import answer as answers
from nixfleet.agent import confirm
from nixfleet.agent import health as healthmod
from nixfleet.agent.activate import Activator, Result, observe_current
from nixfleet.agent.config import (
    AgentConfig,
    read_enroll_token,
    read_token,
    reload_if_changed,
)
from nixfleet.agent.reboot import Rebooter
from nixfleet.agent.reboot import observe as observe_boot
from nixfleet.agent.state import AgentState, StateStore
from nixfleet.client import Client
from nixfleet.errors import GoneError, NixfleetError, ProtocolError, UnreachableError
from nixfleet.models import HealthResult

log = logging.getLogger(__name__)

JITTER = 0.10
GONE_RETRY = 3600.0  # seconds between attempts once the CP says the machine is decommissioned
MESSAGE_MAX = 4096


class Status(enum.IntEnum):
    """How a cycle ended; doubles as the exit code of `--once` (CLI codes, DESIGN §6)."""

    OK = 0
    FAILED = 1
    UNREACHABLE = 5
    AUTH = 6


def _printable_health(health: wire.Health) -> wire.Health:
    """Check names and output come from commands: escape what the CP refuses (U+001B …)."""
    for result in health["results"]:
        result["name"] = schemas.printable(result["name"])
        if "message" in result:
            result["message"] = schemas.printable(result["message"])
    return health


def decide(
    desired: str | None, current: str | None, state: AgentState, retry_requested_at: str | None
) -> bool:
    """Pure: should this cycle deploy `desired`?"""
    if desired is None or desired == current:
        return False
    if desired not in state.failures:
        return True
    # An operator's retry request buys exactly one more attempt: one the agent has not
    # tried under yet. Compared as the CP's own value, never with the agent's clock.
    return retry_requested_at is not None and retry_requested_at != state.retries.get(desired)


class Agent:
    """One machine's agent; `run()` loops until `stop()` (SIGTERM) or after one cycle."""

    def __init__(self, config: AgentConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.store = StateStore(config.state_dir)
        self.stop_event = threading.Event()
        self.activator = Activator(config, self.store, stopping=self.stop_event.is_set)
        self.window = confirm.Window(config.state_dir)
        self.rebooter = Rebooter(config.machine_id, config.state_dir, config.reboot_command)
        self.rng = rng or random.Random()
        self.started = time.monotonic()
        self.client: Client | None = None
        self.failed_polls = 0
        self.recovered = False
        # Until the CP has answered once, the persisted last desired generation may be
        # stale; an unconcluded failure found at start is reported meanwhile.
        self.desired_seen = False
        # A fetch failure changes nothing on the machine, so it is not recorded as a
        # failed generation (a later poll retries it) but it is reported meanwhile.
        self.fetch_failure: Result | None = None

    # --- plumbing ------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def _client(self) -> Client | None:
        if self.client is None:
            token = read_token(self.config) or self._enroll()
            if token is None:
                return None
            self.client = Client(self.config.control_plane_url, token, timeout=30.0)
        return self.client

    def _enroll(self) -> str | None:
        """Exchange an enrollment token for a machine token, kept in the state dir."""
        enroll_token = read_enroll_token(self.config)
        if enroll_token is None:
            return None
        client = Client(self.config.control_plane_url, enroll_token, timeout=30.0)
        try:
            token = client.enroll(self.config.machine_id, self.config.tags)["token"]
        except ProtocolError as e:  # answered, but not with the documented body
            log.error("enrollment answered without a token: %s", e)
            return None
        finally:
            client.close()
        if not isinstance(token, str) or not token:
            log.error("enrollment answered without a token")
            return None
        path = Path(self.config.state_dir) / "token"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log.info("enrolled %s; machine token stored in %s", self.config.machine_id, path)
        return token

    def uptime(self) -> int:
        """System uptime (operators spot reboots); the agent's own if /proc is hidden."""
        try:
            return int(float(Path("/proc/uptime").read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            return int(time.monotonic() - self.started)

    def _reload_config(self) -> None:
        """Take a changed config file (a switch may bring new tags); see config.py."""
        fresh = reload_if_changed(self.config)
        if fresh is None:
            return
        if (fresh.control_plane_url, fresh.token_file) != (
            self.config.control_plane_url,
            self.config.token_file,
        ):
            self._drop_client()
        # The state dir (and so the store) stays the one the agent started with.
        self.config = self.activator.config = fresh

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _delay(self, base: float) -> float:
        return max(0.0, base * self.rng.uniform(1 - JITTER, 1 + JITTER))

    def backoff(self) -> float:
        """Capped exponential back-off, never longer than the poll interval, so the
        agent catches up within one poll interval after the CP returns (DESIGN §5)."""
        exp: float = self.config.backoff_initial * 2.0 ** min(self.failed_polls - 1, 30)
        return min(exp, self.config.backoff_max, self.config.poll_interval)

    # --- reports -------------------------------------------------------------------

    def report_body(self, current: str, health: HealthResult | None) -> wire.ReportBody:
        """DESIGN §4 report body: the failure that concerns the desired generation, if any."""
        state = self.store.load()
        body: wire.ReportBody = {
            "current_generation": current,
            "tags": list(self.config.tags),
            "agent_version": __version__,
            "uptime_seconds": self.uptime(),
        }
        if health is not None:
            body["health"] = _printable_health(health.to_dict())
        boot = observe_boot(self.config.booted_system, self.config.current_system)
        body = {**body, **boot.report_fields()}
        failed, message = self._failure_for(state, current)
        if failed is not None:
            body["success"], body["message"], body["attempted_generation"] = False, message, failed
            last = state.last_outcome
            if last and last.generation == failed and last.output and not last.output_reported:
                body["output"] = last.output  # once: the CP keeps it with the failure
        else:
            last = state.last_outcome
            ok = last is not None and last.success and last.generation == current
            body["success"], body["message"] = True, last.message if ok and last else "running"
        body["message"] = schemas.printable(body["message"])[:MESSAGE_MAX]
        return body

    def _failure_for(self, state: AgentState, current: str) -> tuple[str | None, str]:
        desired = state.last_desired
        ff = self.fetch_failure
        if ff is not None and ff.generation == desired and desired != current:
            return ff.generation, ff.message
        if desired is not None and desired != current and desired in state.failures:
            return desired, state.failures[desired].message
        last = state.last_outcome
        if not self.desired_seen and last is not None and not last.success:
            return last.generation, last.message
        return None, ""

    def _report(self, client: Client, health: HealthResult | None) -> answers.Answer | None:
        self._reload_config()
        current = observe_current(self.config)
        if current is None:
            log.warning(
                "no current system at %s: not reporting (the control plane needs "
                "a current generation)",
                self.config.current_system,
            )
            return None
        body = self.report_body(current, health)
        answer = client.report(self.config.machine_id, body)
        desired = answers.parse(answer, self.config)
        self.desired_seen = True
        state = self.store.load()
        if "output" in body and state.last_outcome is not None:
            state = replace(state, last_outcome=replace(state.last_outcome, output_reported=True))
            self.store.save(state)
        if state.last_desired != desired.generation:
            self.store.save(replace(state, last_desired=desired.generation))
        return desired

    def _ask_desired(self, client: Client) -> answers.Answer:
        """Read-only look-up, for dry-run and for a machine with no current system."""
        answer = client.desired_generation(self.config.machine_id)
        self.desired_seen = True
        return answers.parse(answer, self.config)

    # --- one cycle -----------------------------------------------------------------

    def cycle(self) -> tuple[Status, float]:
        """Run one cycle; return its status and how long to sleep before the next."""
        try:
            return self._cycle()
        finally:
            if self.client is not None:
                # No idle connection between polls: a fleet of agents must not hold an
                # open socket each on the CP (nor keep a stopping CP waiting for them).
                self.client.close()

    def _cycle(self) -> tuple[Status, float]:
        self._reload_config()
        if not self.recovered:
            self.recovered = True
            self._expire_window()
            result = self.activator.recover()
            if result is not None:
                log.info("recovered unfinished activation: %s", result.message)
        try:
            client = self._client()
            if client is None:
                log.error(
                    "no machine token (looked in token_file, $CREDENTIALS_DIRECTORY/token, "
                    "%s/token) and no enrollment token (enroll_token_file, "
                    "$CREDENTIALS_DIRECTORY/enroll-token)",
                    self.config.state_dir,
                )
                return Status.AUTH, self._delay(self.config.poll_interval)
            status, hint = self._converge(client)
        except UnreachableError as e:
            self.failed_polls += 1
            delay = self._delay(self.backoff())
            log.warning(
                "control plane unreachable (%d in a row): %s; keeping the current "
                "generation; retrying in %.2fs (back-off %gs)",
                self.failed_polls,
                e.detail,
                delay,
                self.backoff(),
            )
            return Status.UNREACHABLE, delay
        except GoneError as e:
            # Decommissioned (DESIGN §3): nothing to do until an operator acts; asking
            # every poll interval would only load the CP. The current generation stays.
            self.failed_polls = 0
            delay = self._delay(GONE_RETRY)
            log.warning(
                "control plane says this machine is decommissioned (%s); "
                "next attempt in %.0fs (once an hour)",
                e.detail,
                delay,
            )
            return Status.FAILED, delay
        except NixfleetError as e:
            self.failed_polls = 0
            if e.exit_code == Status.AUTH:
                self._drop_client()  # the token may have been rotated: re-read it
            log.error("control plane refused the agent: %s", e)
            return (
                Status.AUTH if e.exit_code == Status.AUTH else Status.FAILED,
                self._delay(self.config.poll_interval),
            )
        if self.failed_polls:
            log.info("control plane reachable again after %d failed polls", self.failed_polls)
        self.failed_polls = 0
        return status, self._delay(hint if hint is not None else self.config.poll_interval)

    def _converge(self, client: Client) -> tuple[Status, float | None]:
        current = observe_current(self.config)
        if self.config.dry_run:
            desired = self._ask_desired(client)
            want = decide(
                desired.generation, current, self.store.load(), desired.retry_requested_at
            )
            if want and desired.generation:
                log.info(
                    "%s",
                    self.activator.plan(
                        desired.generation, desired.cache_url or self.config.cache_url
                    ),
                )
            else:
                log.info(
                    "dry-run: nothing to do (current %s, desired %s)", current, desired.generation
                )
            return Status.OK, desired.poll_hint
        armed = self.window.load()
        health: HealthResult | None = None
        if current is None:
            desired = self._ask_desired(client)
        elif armed is not None and armed.generation == current:  # restarted inside the window
            health = healthmod.run_configured(self.config)
            desired = self._confirm(armed, health)
            current = observe_current(self.config)
        else:
            health = healthmod.run_configured(self.config)
            answer = self._report(client, health)
            assert answer is not None
            desired = answer
        state = self.store.load()
        if state.last_desired != desired.generation:
            self.store.save(replace(state, last_desired=desired.generation))
            state = self.store.load()
        if desired.generation is None or desired.generation == current:
            self.fetch_failure = None
            self.rebooter.step(
                client,
                observe_boot(self.config.booted_system, self.config.current_system),
                current,
                desired.generation,
                wanted=desired.reboot,
                healthy=health is None or health.all_passed,
            )
            return Status.OK, desired.poll_hint
        if not decide(desired.generation, current, state, desired.retry_requested_at):
            log.info(
                "not re-applying %s: it failed here at %s (%s); waiting for a new desired "
                "generation or a retry request",
                desired.generation,
                state.failures[desired.generation].at,
                state.failures[desired.generation].message,
            )
            return Status.OK, desired.poll_hint
        self.store.save(state.with_attempt(desired.generation, desired.retry_requested_at))
        result = self.activator.deploy(
            desired.generation, desired.cache_url or self.config.cache_url
        )
        self.fetch_failure = None if result.changed or result.success else result
        health = result.health if result.success else healthmod.run_configured(self.config)
        timeout = desired.confirm_timeout or self.config.confirm_timeout
        if result.success and result.changed and timeout and current is not None:
            # Reported right before the switch (above): the confirm window applies.
            armed = self.window.arm(result.generation, current, timeout)
            confirmed = self._confirm(armed, health)
            kept = observe_current(self.config) == result.generation
            return (Status.OK if kept else Status.FAILED), confirmed.poll_hint
        after = self._report(client, health)
        status = Status.OK if result.success else Status.FAILED
        hint = after.poll_hint if after is not None else desired.poll_hint
        return status, hint

    # --- the confirm window (agent.confirm) -----------------------------------------

    def _confirm(self, armed: confirm.Armed, health: HealthResult | None) -> answers.Answer:
        """Report until one completes within the window, else roll back and say why.

        Each attempt gets a client whose deadline is what is left of the window, so
        a network that drops packets cannot hold one attempt past it.
        """
        got: list[answers.Answer] = []

        def report() -> None:
            left = max(1.0, armed.deadline - time.time())
            client = Client(
                self.config.control_plane_url, read_token(self.config), timeout=min(30.0, left)
            )
            try:
                desired = self._report(client, health)
            finally:
                client.close()
            assert desired is not None
            got.append(desired)

        if self.window.wait(armed, report, self.stop_event.is_set):
            return got[-1]
        log.error(
            "%s after switching to %s: rolling back to %s",
            confirm.reason(armed.timeout),
            armed.generation,
            armed.previous,
        )
        self.activator.roll_back(armed.generation, armed.previous, confirm.reason(armed.timeout))
        self.window.disarm()
        client = self._client()  # report the rollback now if the CP is reachable again
        assert client is not None
        after = self._report(client, healthmod.run_configured(self.config))
        assert after is not None
        return after

    def _expire_window(self) -> None:
        """At start: a window whose deadline passed while no agent ran rolls back now."""
        armed = self.window.load()
        if armed is None:
            return
        state = self.store.load()
        rolling_back = state.in_progress is not None and (
            state.in_progress.generation == armed.generation
        )
        if observe_current(self.config) != armed.generation and not rolling_back:
            self.window.disarm()  # concluded (rolled back, or another generation since)
            return
        if time.time() < armed.deadline and not rolling_back:
            return  # still inside: _converge keeps trying to report
        if rolling_back:
            self.store.save(replace(state, in_progress=None))
        log.error("%s: rolling back to %s", confirm.reason(armed.timeout), armed.previous)
        self.activator.roll_back(armed.generation, armed.previous, confirm.reason(armed.timeout))
        self.window.disarm()

    # --- the loop ------------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        log.info(
            "nixfleet-agent %s for %s, control plane %s%s",
            __version__,
            self.config.machine_id,
            self.config.control_plane_url,
            " (dry-run)" if self.config.dry_run else "",
        )
        try:
            while True:
                try:
                    status, delay = self.cycle()
                except Exception:
                    # A bug or a full disk must not end the service: the machine keeps
                    # its generation and the next cycle starts from observed state again.
                    log.exception("agent cycle failed unexpectedly")
                    if once:
                        return int(Status.FAILED)
                    self._drop_client()
                    status, delay = Status.FAILED, self._delay(self.config.poll_interval)
                if once:
                    return int(status)
                log.debug("sleeping %.2fs", delay)
                if self.stop_event.wait(delay):
                    log.info("stopping")
                    return 0
        finally:
            self._drop_client()
