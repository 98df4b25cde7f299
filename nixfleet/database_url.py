"""`database_url`: which database a control plane opens (docs/scaling.md "PostgreSQL backend").

- `sqlite:PATH` or a plain file path: that SQLite file (the embedded default;
  `sqlite:///var/lib/x.db` is `/var/lib/x.db`, as SQLAlchemy spells it).
- `postgresql://…` (or `postgres://…`): a libpq connection URI — user, host, port,
  database, and libpq's query parameters (`host=/run/postgresql` for the socket,
  `sslmode`, `passfile`, `application_name`, …), checked by libpq's own parser.

A password inside the URL is refused: it would sit in argv (`--database-url`) or a
settings file, where DESIGN §7 keeps no secret. Peer authentication over the socket
needs none; otherwise libpq reads it from a file (`passfile=`, PGPASSFILE).

Pure (no I/O): settings.py parses with it, and messages name the field.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nixfleet.errors import FieldError, ValidationError

FIELD = "database_url"
POSTGRES_SCHEMES = ("postgresql", "postgres")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class DatabaseURL:
    """A parsed `database_url`: an SQLite file, or a PostgreSQL connection URI."""

    backend: Literal["sqlite", "postgresql"]
    path: Path | None = None  # sqlite
    conninfo: str | None = None  # postgresql: the URI as given (it holds no password)

    @property
    def display(self) -> str:
        """For logs and messages."""
        return f"sqlite:{self.path}" if self.path is not None else str(self.conninfo)


def invalid(message: str) -> ValidationError:
    return ValidationError("invalid control-plane settings", errors=[FieldError(FIELD, message)])


def parse(text: str) -> DatabaseURL:
    """`text` as a DatabaseURL; ValidationError naming `database_url` when malformed."""
    if not isinstance(text, str) or not text:
        raise invalid("expected sqlite:PATH, a file path, or postgresql://USER@HOST/DB")
    scheme, sep, rest = text.partition(":")
    if sep and scheme.lower() in POSTGRES_SCHEMES:
        return _postgresql(text)
    if sep and scheme.lower() == "sqlite":
        path = rest[2:] if rest.startswith("//") else rest
        if not path:
            raise invalid("sqlite: needs the database file's path, e.g. sqlite:/var/lib/x.db")
        return DatabaseURL("sqlite", path=Path(path))
    if sep and "://" in text and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise invalid(
            f"unknown scheme {scheme[:20]!r}; expected sqlite:PATH, a file path, "
            "or postgresql://USER@HOST/DB"
        )
    return DatabaseURL("sqlite", path=Path(text))


def _postgresql(text: str) -> DatabaseURL:
    if _BAD_CHARS.search(text):
        raise invalid("a postgresql:// URL may not hold spaces or control characters")
    parts = urllib.parse.urlsplit(text)
    if not text.lower().startswith(tuple(s + "://" for s in POSTGRES_SCHEMES)):
        raise invalid("expected postgresql://USER@HOST[:PORT]/DATABASE")
    if parts.password is not None or any(
        key == "password" for key, _ in urllib.parse.parse_qsl(parts.query)
    ):
        raise invalid(
            "holds a password; keep it out of URLs and settings: use peer authentication "
            "over the socket (host=/run/postgresql), or a password file (passfile=PATH)"
        )
    try:
        port = parts.port
    except ValueError:
        raise invalid("the port must be a number from 1 to 65535") from None
    if port == 0:
        raise invalid("the port must be a number from 1 to 65535")
    if parts.path.strip("/").count("/") > 0:
        raise invalid("the path names one database: postgresql://USER@HOST/DATABASE")
    if parts.fragment:
        raise invalid("a postgresql:// URL has no #fragment")
    try:
        from psycopg import ProgrammingError, conninfo
    except ImportError:
        raise invalid(
            "postgresql:// needs psycopg, the optional extra: pip install 'nixfleet[postgresql]'"
        ) from None
    try:
        conninfo.conninfo_to_dict(text)  # libpq's own parser: unknown parameters, bad values
    except ProgrammingError as e:  # its message is libpq's
        raise invalid(f"libpq refuses it: {str(e).strip()}") from None
    return DatabaseURL("postgresql", conninfo=text)
