"""A decommissioned machine's agent: told 410 Gone, it backs off to one attempt an hour."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ControlPlane

from nixfleet.agent.config import AgentConfig
from nixfleet.agent.loop import GONE_RETRY, JITTER, Agent, Status
from nixfleet.errors import GoneError


def test_decommissioned_agent_backs_off_an_hour_and_says_why(
    control_plane: ControlPlane,
    make_config: Callable[..., AgentConfig],
    base_system: str,
    machine: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = control_plane.register("web-01")
    (tmp_path / "token").write_text(token + "\n")
    config = make_config(control_plane_url=control_plane.url, token_file=str(tmp_path / "token"))
    agent = Agent(config)
    status, delay = agent.cycle()
    assert status is Status.OK and delay <= config.poll_interval * (1 + JITTER)
    control_plane.client().set_lifecycle("web-01", "decommissioned")
    with caplog.at_level(logging.WARNING, logger="nixfleet.agent.loop"):
        status, delay = agent.cycle()
    assert status is Status.FAILED
    assert GONE_RETRY * (1 - JITTER) <= delay <= GONE_RETRY * (1 + JITTER)
    assert "decommissioned" in caplog.text and "once an hour" in caplog.text
    assert machine.current == base_system  # it keeps what it runs
    # Every agent route says the same, with a detail naming the state.
    agent_client = control_plane.client(token)
    for call in (
        lambda: agent_client.report("web-01", {"current_generation": base_system}),
        lambda: agent_client.desired_generation("web-01"),
    ):
        with pytest.raises(GoneError, match="decommissioned"):
            call()
