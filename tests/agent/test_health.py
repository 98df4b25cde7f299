"""Health checks against real processes and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from nixfleet.agent import health
from nixfleet.agent.config import CommandCheck, HealthChecks, HttpCheck


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = int(self.path.strip("/") or 200)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def web() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_command_checks() -> None:
    ok = health.check_command(CommandCheck("ok", ("true",)))
    assert ok.passed and ok.kind == "command" and ok.message == "exit 0"
    bad = health.check_command(CommandCheck("bad", ("sh", "-c", "echo broken >&2; exit 3")))
    assert not bad.passed and bad.message == "exit 3: broken"
    slow = health.check_command(CommandCheck("slow", ("sleep", "5"), timeout=0.2))
    assert not slow.passed and "timed out" in slow.message
    missing = health.check_command(CommandCheck("missing", ("/nonexistent/check",)))
    assert not missing.passed and "not found" in missing.message


def test_http_checks(web: str) -> None:
    assert health.check_http(HttpCheck("ok", f"{web}/200")).passed
    assert health.check_http(HttpCheck("teapot", f"{web}/418", expected_status=418)).passed
    bad = health.check_http(HttpCheck("err", f"{web}/500"))
    assert not bad.passed and bad.message == "HTTP 500, expected 200"
    down = health.check_http(HttpCheck("down", "http://127.0.0.1:9/", timeout=2))
    assert not down.passed and down.message.startswith("GET http://127.0.0.1:9/")


def test_systemd_unit_check_fails_without_an_active_unit() -> None:
    # No unit called like this is active anywhere (and this container has no systemd).
    r = health.check_systemd_unit("nixfleet-test-no-such-unit.service")
    assert not r.passed and r.kind == "systemd" and r.name == "nixfleet-test-no-such-unit.service"


def test_run_checks_runs_all_and_shapes_results(web: str) -> None:
    checks = HealthChecks(
        http=(HttpCheck("site", f"{web}/200"),),
        command=(CommandCheck("ok", ("true",)), CommandCheck("no", ("false",))),
    )
    result = health.run_checks(checks, systemd_available=False)
    assert not result.all_passed
    doc = result.to_dict()
    assert [(r["name"], r["kind"], r["passed"]) for r in doc["results"]] == [
        ("site", "http", True),
        ("ok", "command", True),
        ("no", "command", False),
    ]
    assert all(isinstance(r["duration_ms"], int) for r in doc["results"])
    assert health.failures(result) == "no: exit 1"


def test_default_check_only_with_systemd() -> None:
    vacuous = health.run_checks(HealthChecks(), systemd_available=False)
    assert vacuous.all_passed and vacuous.results == ()
    default = health.run_checks(HealthChecks(), systemd_available=True)
    assert [(r.name, r.kind) for r in default.results] == [("system", "system")]
    message = default.results[0].message
    assert message.startswith("system is")
    # In this container systemd is "offline", so the default check fails here.
    assert default.all_passed == (message in ("system is running", "system is degraded"))
