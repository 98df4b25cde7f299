"""nixfleet.process, the one place subprocesses run: real processes, every outcome."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nixfleet import process
from nixfleet.errors import CommandError

PY = sys.executable


def test_run_captures_text_output_exit_code_and_time(tmp_path: Path) -> None:
    done = process.run(
        [PY, "-c", "import os, sys; print(os.getcwd()); print(sys.stdin.read(), end='')"],
        cwd=tmp_path,
        input="from stdin",
    )
    assert done.returncode == 0
    assert done.stdout.splitlines() == [str(tmp_path), "from stdin"]
    assert done.argv[0] == PY and done.seconds >= 0


def test_run_passes_exactly_the_given_environment() -> None:
    code = "import os; print(sorted(k for k in os.environ if k.startswith('NF_')))"
    done = process.run([PY, "-c", code], env={"NF_ONE": "1", "NF_TWO": "2"})
    assert done.stdout.strip() == "['NF_ONE', 'NF_TWO']"


def test_a_failure_raises_with_the_tail_of_stderr() -> None:
    code = "import sys; sys.stderr.write('x' * 5000 + 'the reason'); sys.exit(3)"
    with pytest.raises(CommandError) as e:
        process.run([PY, "-c", code])
    message = str(e.value)
    assert "exited 3" in message and message.endswith("the reason")
    assert len(message) < process.STDERR_TAIL + 200


def test_without_stderr_the_tail_of_stdout_explains() -> None:
    with pytest.raises(CommandError, match="exited 1: out only"):
        process.run([PY, "-c", "print('out only'); raise SystemExit(1)"])


def test_check_false_returns_the_failure() -> None:
    done = process.run([PY, "-c", "raise SystemExit(4)"], check=False)
    assert done.returncode == 4


def test_a_timeout_is_a_command_error() -> None:
    with pytest.raises(CommandError, match=r"timed out after 0\.2s"):
        process.run([PY, "-c", "import time; time.sleep(30)"], timeout=0.2)


def test_a_missing_command_is_named() -> None:
    with pytest.raises(CommandError, match="nixfleet-no-such-tool: command not found"):
        process.run(["nixfleet-no-such-tool"])
    with pytest.raises(CommandError, match="command not found"):
        process.spawn(["nixfleet-no-such-tool"], log_file=Path("/dev/null"))


def test_spawn_writes_output_to_its_log_and_detaches(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    code = "import os; print('hello', flush=True); print(os.getsid(0) == os.getpid())"
    proc = process.spawn([PY, "-c", code], log_file=log, detach=True)
    assert proc.wait(timeout=30) == 0
    assert log.read_text().splitlines() == ["hello", "True"]
