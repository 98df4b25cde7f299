"""Socket-level plumbing of the client (nixfleet.client): one TOTAL deadline per HTTP
exchange, however slowly the bytes trickle, and the probes that tell what answered when
the exchange failed (plain HTTP on an https:// URL, TLS on an http:// one)."""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import time
from typing import Any


class DeadlineReader(io.RawIOBase):
    """A socket's read side that gives up at a fixed moment, however the bytes trickle."""

    def __init__(self, sock: socket.socket, deadline: float, keep: Any) -> None:
        self._sock = sock
        self._deadline = deadline
        # The socket's own makefile() holds a reference that keeps the descriptor open
        # when the connection is closed under a response (HTTP/1.0, Connection: close).
        self._keep = keep

    def close(self) -> None:
        self._keep.close()
        super().close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline exceeded")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class DeadlineResponse(http.client.HTTPResponse):
    deadline = 0.0

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(DeadlineReader(sock, self.deadline, self.fp))


def response_class(deadline: float) -> type[DeadlineResponse]:
    return type("_DeadlineResponse", (DeadlineResponse,), {"deadline": deadline})


def handshake_done(conn: http.client.HTTPConnection) -> bool:
    return isinstance(conn.sock, ssl.SSLSocket)


def plain_http_answer(host: str, port: int) -> str | None:
    """What a plain-HTTP request to host:port gets: its status line, "" if nothing
    HTTP-like, None if nothing accepts the connection at all."""
    try:
        sock = socket.create_connection((host, port), timeout=2.0)
    except OSError:
        return None
    try:
        sock.settimeout(2.0)
        sock.sendall(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        line = sock.recv(200).split(b"\r\n", 1)[0]
    except OSError:
        return ""
    finally:
        sock.close()
    return line.decode(errors="replace") if line.startswith(b"HTTP/") else ""


def speaks_tls(host: str, port: int) -> bool:
    """Whether a TLS handshake succeeds at host:port (no verification: only asking)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=2.0) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except (OSError, ValueError):
        return False
