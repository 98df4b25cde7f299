"""New secret files: mode 0600 from the start, never over another file.

Shared by the CLI (`keys create --output`, …) and the control-plane host command
(`nixfleet-control-plane keys create --output`): redirecting stdout under the usual
umask 022 would leave a 0644 file, which the CLI then refuses to read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from nixfleet.errors import UsageError


@contextlib.contextmanager
def secret_file(path: Path) -> Iterator[Callable[[str], None]]:
    """A new file for a secret: mode 0600 from the start (O_EXCL: never over another file).

    Opened before the secret is made, so a path that cannot be written fails first;
    removed again if no secret was written (the request failed).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(
            f"{path} exists; choose a new file name (a secret is never written over a file)"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot create {path}: {e.strerror}") from e
    written = False

    def write(secret: str) -> None:
        nonlocal written
        f.write(secret + "\n")
        f.flush()
        written = True

    try:
        with os.fdopen(fd, "w") as f:
            yield write
    finally:
        if not written:
            path.unlink(missing_ok=True)
