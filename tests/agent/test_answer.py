"""The agent trusts nothing the control plane says (issue 14, part 4; DESIGN §5).

A hostile control plane here is a real HTTP server on 127.0.0.1 answering the real
agent's reports with what an attacker (or a broken proxy) would send; the agent runs
its real cycle against it, with real Nix and a real state directory.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nixfleet.agent import answer
from nixfleet.agent.config import AgentConfig
from nixfleet.agent.loop import Agent, Status, decide
from nixfleet.agent.state import AgentState, StateStore
from nixfleet.errors import ValidationError

GEN = "/nix/store/" + "b" * 32 + "-nixos-system-web-01"


class HostileCP:
    """Answers every request with `body` (bytes, JSON or not) and records the requests."""

    def __init__(self) -> None:
        self.body = b'{"desired_generation": null}'
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                outer.requests.append((self.command, self.path))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, doc: Any) -> None:
        """Bytes as they are; a dict completed with the documented fields it lacks."""
        if isinstance(doc, dict):
            doc = {"desired_generation": None, "cache_url": None, "poll_hint": None, **doc}
        self.body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile() -> Iterator[HostileCP]:
    cp = HostileCP()
    yield cp
    cp.close()


@pytest.fixture
def hostile_agent(
    hostile: HostileCP, make_config: Callable[..., AgentConfig], base_system: str, tmp_path: Path
) -> Agent:
    token = tmp_path / "token"
    token.write_text("a-token\n")
    config = make_config(
        control_plane_url=hostile.url, token_file=str(token), poll_interval=60, backoff_max=60
    )
    return Agent(config)


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        (1e9, 60.0),  # slept 34 years
        (10**12, 60.0),
        (0, 1.0),
        (-5, 1.0),
        (0.001, 1.0),
        (7, 7.0),
    ],
)
def test_poll_hints_are_clamped_to_one_second_and_the_poll_interval(
    hostile: HostileCP, hostile_agent: Agent, hint: float, expected: float
) -> None:
    hostile.answer({"desired_generation": None, "poll_hint": hint})
    status, delay = hostile_agent.cycle()
    assert status is Status.OK
    assert expected * 0.89 <= delay <= expected * 1.11


@pytest.mark.parametrize(
    "raw",
    [
        b'{"desired_generation": null, "cache_url": null, "poll_hint": Infinity}',
        b'{"desired_generation": null, "cache_url": null, "poll_hint": NaN}',
    ],
)
def test_infinity_and_nan_hints_do_not_kill_the_agent(
    hostile: HostileCP, hostile_agent: Agent, raw: bytes
) -> None:
    hostile.answer(raw)
    status, delay = hostile_agent.cycle()
    assert math.isfinite(delay) and delay <= 60 * 1.11
    assert status is Status.OK


@pytest.mark.parametrize(
    "body",
    [b"[]", b'"desired"', b"null", b"17", b'[{"desired_generation": null}]'],
)
def test_a_body_that_is_not_an_object_is_an_error_of_the_cycle(
    hostile: HostileCP, hostile_agent: Agent, body: bytes, machine: Any, base_system: str
) -> None:
    hostile.answer(body)
    status, delay = hostile_agent.cycle()  # no exception escapes
    assert status is Status.FAILED
    assert machine.current == base_system
    assert 0 < delay <= 60 * 1.11


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"desired_generation": GEN, "cache_url": "ssh://attacker@evil.example"}, "ssh"),
        ({"desired_generation": GEN, "cache_url": "file:///tmp/evil-cache"}, "file"),
        ({"desired_generation": GEN, "cache_url": "s3://bucket"}, "s3"),
        ({"desired_generation": "--store=/tmp/evil"}, "store path"),
        ({"desired_generation": GEN + " --option substituters x"}, "store path"),
        ({"desired_generation": GEN + "\n"}, "store path"),
        ({"desired_generation": "/nix/store/../../etc/passwd"}, "store path"),
        ({"desired_generation": ["/nix/store/x"]}, "store path"),
    ],
)
def test_untrusted_generations_and_cache_urls_never_reach_nix(
    hostile: HostileCP,
    hostile_agent: Agent,
    machine: Any,
    base_system: str,
    doc: dict[str, Any],
    why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hostile.answer(doc)
    status, _ = hostile_agent.cycle()
    assert status is Status.FAILED
    assert why in caplog.text
    assert machine.current == base_system == machine.profile_target
    state = StateStore(machine.state_dir).load()
    assert state.in_progress is None and state.last_outcome is None  # nothing was attempted


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (120, 120.0), (0.2, 1.0), (10**9, 86400.0), (86400, 86400.0)],
)
def test_a_confirm_window_is_clamped_to_the_agents_own_bounds(
    make_config: Callable[..., AgentConfig], value: Any, expected: float | None
) -> None:
    got = answer.parse({"desired_generation": GEN, "confirm_timeout": value}, make_config())
    assert got.confirm_timeout == expected
    assert answer.max_confirm() == 86400.0  # agent-config.schema.json's maximum


@pytest.mark.parametrize(
    "raw",
    [
        b'{"desired_generation": null, "cache_url": null, "poll_hint": 5, "confirm_timeout": "120s"}',
        b'{"desired_generation": null, "cache_url": null, "poll_hint": 5, "confirm_timeout": true}',
        b'{"desired_generation": null, "cache_url": null, "poll_hint": 5, "confirm_timeout": 0}',
        b'{"desired_generation": null, "cache_url": null, "poll_hint": 5, "confirm_timeout": -5}',
        b'{"desired_generation": null, "cache_url": null, "poll_hint": 5, "confirm_timeout": NaN}',
        b'{"desired_generation": null, "cache_url": null, "poll_hint": 5, "confirm_timeout": Infinity}',
        b'{"desired_generation": null, "cache_url": null, "poll_hint": 5, "confirm_timeout": [120]}',
    ],
)
def test_a_bad_confirm_window_is_an_error_of_the_cycle_naming_it(
    hostile: HostileCP,
    hostile_agent: Agent,
    raw: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hostile.answer(raw)
    status, delay = hostile_agent.cycle()  # no exception escapes
    assert status is Status.FAILED
    assert "confirm_timeout" in caplog.text
    assert 0 < delay <= 60 * 1.11


def test_a_scheme_the_config_allows_is_accepted(make_config: Callable[..., AgentConfig]) -> None:
    config = make_config(allowed_cache_schemes=["file"])
    got = answer.parse({"desired_generation": GEN, "cache_url": "file:///srv/cache"}, config)
    assert got.cache_url == "file:///srv/cache" and got.generation == GEN
    with pytest.raises(ValidationError):
        answer.parse({"cache_url": "ssh://x"}, config)
    assert answer.parse({"cache_url": "https://c.example"}, make_config()).cache_url


def test_retry_does_not_depend_on_the_clocks_agreeing(
    hostile: HostileCP, hostile_agent: Agent, machine: Any
) -> None:
    """The agent's clock runs a year ahead of the CP's: a retry request still retries once."""
    store = StateStore(machine.state_dir)
    store.save(AgentState().with_failure(GEN, "rolled back: x", "2027-12-02T00:00:00Z"))
    retry = "2026-12-02T00:00:00Z"  # the CP's clock: before the agent's idea of the failure
    hostile.answer({"desired_generation": GEN, "retry_requested_at": retry})
    hostile_agent.cycle()
    state = store.load()
    assert state.retries.get(GEN) == retry  # it tried again, under this request
    before = len(hostile.requests)
    hostile_agent.cycle()  # the same request again: no second attempt
    assert store.load().retries.get(GEN) == retry
    assert len(hostile.requests) == before + 1  # one report, no post-attempt report
    assert not decide(GEN, None, store.load(), retry)
    assert decide(GEN, None, store.load(), "2020-01-01T00:00:00Z")  # a new request, any clock
