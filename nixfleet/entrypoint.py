"""The one place, per program, where exceptions become exit codes (DESIGN §2 rule 5).

`nixfleet`, `nixfleet-agent` and `nixfleet-control-plane` each run their Click
command through `run`: library code raises NixfleetError (which carries its exit
code) and never SystemExit; Ctrl-C is 130 and a closed stdout pipe 141, quietly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import click

from nixfleet.errors import NixfleetError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader went away (`nixfleet status | head -1`)


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # stderr is gone too; the exit code still tells
        click.echo(text, err=True)


def run(
    command: click.Command,
    args: Sequence[str] | None,
    prog_name: str,
    *,
    obj: Any = None,
    prefix: str = "",
    debug: Callable[[], bool] = lambda: False,
    bug_traceback: bool = True,
    after_error: Callable[[NixfleetError], None] | None = None,
) -> int:
    """Run `command` once and return its exit code; nothing escapes but the code.

    A callback may return an int: that is the exit code (the agent's `--once`).
    `debug()` asks for tracebacks of every error; `bug_traceback` for those of
    unexpected exceptions (services log them; the CLI prints one line instead).
    """
    try:
        try:
            argv = list(sys.argv[1:] if args is None else args)
            with command.make_context(prog_name, argv, obj=obj) as ctx:
                result = command.invoke(ctx)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, while we still decide the code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort as e:
        if isinstance(e.__context__, KeyboardInterrupt | EOFError):
            return EXIT_INTERRUPTED
        _say(f"{prefix}aborted")
        return 1
    except KeyboardInterrupt:
        _say("")  # end the line ^C was echoed on
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader is gone: say nothing, and keep Python's final flush from complaining.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except NixfleetError as e:
        if debug():
            traceback.print_exc()
        _say(f"{prefix}error: {e}")
        if after_error is not None:
            after_error(e)
        return e.exit_code
    except Exception as e:  # a bug: say so; the traceback where it helps
        if bug_traceback or debug():
            traceback.print_exc()
            _say(f"{prefix}error: internal error ({type(e).__name__}: {e})")
        else:
            _say(f"{prefix}error: internal error ({type(e).__name__}: {e}); rerun with --debug")
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


class _Main:
    """`main()` of a Click command routed through `run` (console scripts, CliRunner)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        assert isinstance(self, click.Command)
        name = prog_name or self.name or ""
        code = run(self, args, name, prefix=f"{name}: ", **extra)
        if standalone_mode:
            sys.exit(code)
        return code


class Program(_Main, click.Command):
    pass


class ProgramGroup(_Main, click.Group):
    pass
