"""Health checks run after a switch (and on every poll, so the CP can judge the soak).

Kinds: `systemd` (unit is active), `http` (expected status within a timeout),
`command` (argv exits 0 within a timeout). With none configured, the default check is
`systemctl is-system-running` being `running` or `degraded` — only where systemd runs
the agent (`use_systemd_run`); elsewhere (tests, containers without systemd) no
checks run and health passes vacuously.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from nixfleet import process
from nixfleet.agent.config import AgentConfig, CommandCheck, HealthChecks, HttpCheck
from nixfleet.errors import CommandError
from nixfleet.models import HealthCheckResult, HealthResult

log = logging.getLogger(__name__)

SYSTEMCTL_TIMEOUT = 30.0
MESSAGE_MAX = 500
OK_SYSTEM_STATES = ("running", "degraded")
# Health checks probe this machine's services: never through an http_proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _timed(name: str, kind: str, fn: Callable[[], tuple[bool, str]]) -> HealthCheckResult:
    started = time.monotonic()
    try:
        passed, message = fn()
    except CommandError as e:
        passed, message = False, e.detail
    return HealthCheckResult(
        name=name,
        kind=kind,
        passed=passed,
        duration_ms=int((time.monotonic() - started) * 1000),
        message=message[:MESSAGE_MAX],
    )


def check_systemd_unit(unit: str) -> HealthCheckResult:
    def run() -> tuple[bool, str]:
        done = process.run(["systemctl", "is-active", unit], timeout=SYSTEMCTL_TIMEOUT, check=False)
        state = done.stdout.strip() or done.stderr.strip()
        return done.returncode == 0 and state == "active", state

    return _timed(unit, "systemd", run)


def check_system_running() -> HealthCheckResult:
    def run() -> tuple[bool, str]:
        done = process.run(
            ["systemctl", "is-system-running"], timeout=SYSTEMCTL_TIMEOUT, check=False
        )
        state = done.stdout.strip() or done.stderr.strip()
        return state in OK_SYSTEM_STATES, f"system is {state}"

    return _timed("system", "system", run)


def check_http(check: HttpCheck) -> HealthCheckResult:
    def run() -> tuple[bool, str]:
        request = urllib.request.Request(check.url, method="GET")  # noqa: S310 (schema: http/https)
        try:
            with _OPENER.open(request, timeout=check.timeout) as resp:
                status = int(resp.status)
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            return False, f"GET {check.url}: {reason}"
        if status == check.expected_status:
            return True, f"HTTP {status}"
        return False, f"HTTP {status}, expected {check.expected_status}"

    return _timed(check.name, "http", run)


def check_command(check: CommandCheck) -> HealthCheckResult:
    def run() -> tuple[bool, str]:
        done = process.run(check.argv, timeout=check.timeout, check=False)
        if done.returncode == 0:
            return True, "exit 0"
        tail = (done.stderr.strip() or done.stdout.strip())[-200:]
        return False, f"exit {done.returncode}" + (f": {tail}" if tail else "")

    return _timed(check.name, "command", run)


def run_checks(checks: HealthChecks, *, systemd_available: bool) -> HealthResult:
    """Run every configured check (all of them, so the report names each failure)."""
    results: list[HealthCheckResult] = []
    if checks.empty:
        if systemd_available:
            results.append(check_system_running())
    else:
        results += [check_systemd_unit(u) for u in checks.systemd]
        results += [check_http(c) for c in checks.http]
        results += [check_command(c) for c in checks.command]
    for r in results:
        if not r.passed:
            log.warning("health check %s (%s) failed: %s", r.name, r.kind, r.message)
    return HealthResult(all_passed=all(r.passed for r in results), results=tuple(results))


def run_configured(config: AgentConfig) -> HealthResult:
    return run_checks(config.health_checks, systemd_available=config.use_systemd_run)


def failures(health: HealthResult) -> str:
    """One line naming the failed checks, for `rolled back: <reason>`."""
    return "; ".join(f"{r.name}: {r.message}" for r in health.results if not r.passed)
