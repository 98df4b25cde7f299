"""A failed switch's output reaches the operator: bounded, escaped, sent once, shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from agent.test_acceptance import MID, AgentRunner
from nixfleet.agent.output import OUTPUT_MAX, escape, tail

# 4,000 numbered lines (~150 KiB) and a colour escape at the end.
NOISY = (
    'i=0; while [ $i -lt 4000 ]; do echo "activating unit $i of the fake system ........"; '
    "i=$((i+1)); done; printf 'the \\033[31mlast\\033[0m line\\007\\n' >&2"
)


def test_escape_keeps_newlines_and_tabs_only() -> None:
    assert (
        escape("a\tb\nc\x1b[0m\r\x00\x7f\x85é\ud800")
        == "a\tb\nc\\x1b[0m\\x0d\\x00\\x7f\\x85é\\ud800"
    )


def test_tail_is_bounded_and_starts_at_a_line() -> None:
    text = "".join(f"line {i} é\n" for i in range(20_000))
    out = tail(text)
    assert len(out.encode()) <= OUTPUT_MAX
    assert out.startswith("line ") and out.endswith("line 19999 é")
    assert tail("short\n") == "short"


@pytest.fixture
def agent(machine: Any, control_plane: Any, cache: Any, tmp_path: Path) -> Any:
    runner = AgentRunner(machine, control_plane, cache, tmp_path)
    yield runner
    if runner.proc is not None:
        runner.proc.kill()
        runner.proc.wait()


def test_failing_switch_output_is_stored_with_the_failure_and_shown(
    agent: AgentRunner, base_system: str, published: Any, cache: Any
) -> None:
    bad = published("output-bad", fail=True, extra=NOISY)
    agent.cp.set_desired(MID, bad, cache.url)
    assert agent.once().returncode == 1
    m = agent.state()
    assert m["failed_generation"] == bad
    out = m["failed_output"]
    assert len(out.encode()) <= OUTPUT_MAX
    assert "activating unit 3999 of the fake system" in out
    assert "activating unit 0 of" not in out, "only the tail"
    assert out.endswith(
        "the \\x1b[31mlast\\x1b[0m line\\x07\nwarning: the following units failed: fake.service"
    )
    # Sent once: the next reports leave it out, and the CP keeps it with the failure.
    assert agent.once().returncode == 0
    assert agent.state()["failed_output"] == out
    cli = run_cli(
        "--control-plane-url", agent.cp.url, "--api-key", agent.cp.admin_key,
        "machines", "show", MID,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "switch output of the failed generation" in cli.stdout
    assert "warning: the following units failed: fake.service" in cli.stdout
    assert "\x1b" not in cli.stdout
    # An operator's retry clears the failure, and its output with it.
    agent.cp.client().post(f"/api/v1/machines/{MID}/retry")
    assert agent.state()["failed_output"] is None
