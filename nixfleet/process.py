"""The one place nixfleet runs subprocesses.

Every call has a timeout, is logged (argv only: secrets never travel in argv), and
raises CommandError with the tail of stderr on failure, so callers can report a
useful one-line reason.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nixfleet.errors import CommandError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0
STDERR_TAIL = 2000


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    input: str | None = None,
    check: bool = True,
    merge_output: bool = False,
) -> Completed:
    """Run argv, capture text output, raise CommandError on non-zero exit or timeout.

    merge_output: stderr goes into stdout, interleaved as written (a switch's log).
    """
    args = tuple(str(a) for a in argv)
    log.debug("run: %s", " ".join(args))
    started = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
            text=True,
            errors="replace",
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            input=input,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandError(f"{args[0]} timed out after {timeout:g}s") from e
    except FileNotFoundError as e:
        raise CommandError(f"{args[0]}: command not found; is it installed and on PATH?") from e
    done = Completed(
        args, proc.returncode, proc.stdout, proc.stderr or "", time.monotonic() - started
    )
    log.debug("run: %s exited %d in %.2fs", args[0], proc.returncode, done.seconds)
    if check and proc.returncode != 0:
        tail = proc.stderr.strip()[-STDERR_TAIL:] or proc.stdout.strip()[-STDERR_TAIL:]
        raise CommandError(f"{' '.join(args[:3])} exited {proc.returncode}: {tail}")
    return done


def spawn(
    argv: Sequence[str | Path],
    *,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    detach: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running process (a server, an agent) with its output in log_file.

    detach puts it in its own session, so it outlives the caller (demo --keep).
    """
    args = tuple(str(a) for a in argv)
    log.debug("spawn: %s", " ".join(args))
    with log_file.open("ab") as out:
        try:
            return subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                start_new_session=detach,
            )
        except FileNotFoundError as e:
            raise CommandError(f"{args[0]}: command not found; is it installed and on PATH?") from e
