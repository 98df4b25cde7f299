"""The typed client against real sockets: deadlines, wrong servers, wrong bodies.

Every server here is a real listening socket on 127.0.0.1 (a hand-written one where
the point is misbehaviour, the real control plane otherwise).
"""

from __future__ import annotations

import contextlib
import gc
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ControlPlane

from nixfleet.client import Client
from nixfleet.errors import (
    NotFoundError,
    ProtocolError,
    UnreachableError,
    UsageError,
    ValidationError,
)

Handler = Callable[[socket.socket], None]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def raw_server() -> Iterator[Callable[[Handler], str]]:
    """Start a one-thread socket server with a handler per connection; yield its URL."""
    socks: list[socket.socket] = []
    stop = threading.Event()

    def start(handler: Handler) -> str:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        srv.settimeout(0.2)
        socks.append(srv)

        def loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                threading.Thread(target=_serve, args=(conn, handler), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
        return f"http://127.0.0.1:{srv.getsockname()[1]}"

    def _serve(conn: socket.socket, handler: Handler) -> None:
        with conn:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            with contextlib.suppress(OSError):  # the client gave up: what some tests want
                handler(conn)

    yield start
    stop.set()
    for s in socks:
        s.close()


def answer(status: str, ctype: str, body: bytes) -> Handler:
    def handler(conn: socket.socket) -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)

    return handler


def dribble(head_first: bool, pause: float = 0.25) -> Handler:
    """A valid status answer, one byte at a time: a per-read timeout never fires."""
    body = b'{"generated_at": "x", "stale_after_seconds": 1, "summary": {}, "machines": []}'
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )

    def handler(conn: socket.socket) -> None:
        if head_first:
            conn.sendall(head)
        for b in (b"" if head_first else head) + body:
            conn.sendall(bytes([b]))
            time.sleep(pause)

    return handler


@pytest.mark.parametrize("head_first", [True, False], ids=["slow-body", "slow-headers"])
def test_a_dribbling_server_cannot_hold_the_client_past_its_deadline(
    raw_server: Callable[[Handler], str], head_first: bool
) -> None:
    # The whole answer would arrive after ~20 s; each byte comes well within any
    # per-read timeout. The total deadline (1 s) must end the exchange first.
    url = raw_server(dribble(head_first))
    with pytest.raises(UnreachableError, match=r"did not answer GET /api/v1/status within 1s"):
        Client(url, timeout=1.0).status()


def test_a_web_server_is_named_in_one_line(raw_server: Callable[[Handler], str]) -> None:
    page = b"<!DOCTYPE html><html><body><h1>Welcome to nginx!</h1></body></html>"
    url = raw_server(answer("200 OK", "text/html", page))
    with pytest.raises(ProtocolError) as e:
        Client(url).status()
    text = str(e.value)
    assert "\n" not in text
    assert f"{url} is not a nixfleet control plane" in text
    assert "HTTP 200 text/html" in text and "Welcome to nginx" in text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"[1, 2]", "with list, not the documented JSON object"),
        (b'"ok"', "with str, not the documented JSON object"),
        (b'{"machines": []}', "without generated_at, stale_after_seconds, summary"),
        (b"{not json", "a body that is not JSON"),
    ],
)
def test_a_body_that_is_not_the_documented_object_is_a_clear_error(
    raw_server: Callable[[Handler], str], body: bytes, expected: str
) -> None:
    url = raw_server(answer("200 OK", "application/json", body))
    with pytest.raises(ProtocolError, match=expected):
        Client(url).status()


@pytest.mark.parametrize("collecting", [True, False])
@pytest.mark.parametrize(
    "body", [b'{"n": 1}', b'{"n": 123456789012345678901234567890}', b"{not json"]
)
def test_parsing_an_answer_leaves_the_cyclic_collector_as_it_was(
    raw_server: Callable[[Handler], str], body: bytes, collecting: bool
) -> None:
    """The parse pauses the collector (client._parse, gcpause): it is back as it was
    afterwards, through orjson, through json's fallback for what orjson refuses, and
    after an error."""
    url = raw_server(answer("200 OK", "application/json", body))
    (gc.enable if collecting else gc.disable)()
    try:
        with contextlib.suppress(ProtocolError):
            Client(url).get("/anything")
        assert gc.isenabled() is collecting
    finally:
        gc.enable()


def test_a_proxy_without_its_backend_is_unreachable(raw_server: Callable[[Handler], str]) -> None:
    url = raw_server(answer("502 Bad Gateway", "text/html", b"<html>502 Bad Gateway</html>"))
    with pytest.raises(UnreachableError, match="HTTP 502: a proxy"):
        Client(url).status()


def test_a_closed_port_is_unreachable() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()
    with pytest.raises(UnreachableError, match="is unreachable"):
        Client(f"http://127.0.0.1:{port}").status()


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("127.0.0.1:8470", "use http://127.0.0.1:8470"),
        ("fleet.example.com", "use http://fleet.example.com"),
        ("ftp://fleet.example.com", "expected http://HOST[:PORT]"),
        ("http://fleet.example.com:port", "invalid port"),
    ],
)
def test_a_url_without_a_usable_scheme_is_a_usage_error(url: str, fix: str) -> None:
    with pytest.raises(UsageError) as e:
        Client(url)
    assert fix in str(e.value)


def test_https_against_the_plain_control_plane_says_what_answered(
    control_plane: ControlPlane,
) -> None:
    url = control_plane.url.replace("http://", "https://")
    with pytest.raises(ProtocolError) as e:
        Client(url, control_plane.admin_key).status()
    where = control_plane.url.removeprefix("http://")
    assert f"{where} speaks plain HTTP, not TLS" in str(e.value)
    assert f"use http://{where}" in str(e.value)


def test_typed_operations_round_trip_the_real_control_plane(control_plane: ControlPlane) -> None:
    c = control_plane.client()
    registered = c.register_machine("web-01", ["prod", "web"], issue_token=True)
    assert registered["token"].startswith("nfm_")
    assert c.add_tags("web-01", ["canary"])["tags"] == ["canary", "prod", "web"]
    assert c.remove_tags("web-01", ["canary"])["operator_tags"] == ["prod", "web"]
    assert c.set_lifecycle("web-01", "provisioning")["lifecycle"] == "provisioning"
    answer_ = Client(control_plane.url, registered["token"]).report(
        "web-01", {"current_generation": "/nix/store/" + "a" * 32 + "-nixos-system-web-01"}
    )
    assert answer_["desired_generation"] is None
    assert [m["id"] for m in c.machines(tags=["prod"])["machines"]] == ["web-01"]
    assert c.status()["summary"]["total"] == 1
    assert c.machine("web-01")["history"][-1]["kind"] == "generation"
    page = c.machine_history("web-01", kinds=["lifecycle"])
    assert [e["detail"]["to"] for e in page["events"]] == ["provisioning", "active"]
    assert page["next_after"] is None
    assert c.create_key("ci", "deploy")["key"].startswith("nfk_")
    assert [k["name"] for k in c.keys()["keys"]] == ["ci", "test-admin"]
    assert c.revoke_key("ci")["active"] is False
    token = c.create_enroll_token(2, 3600, ["lab"])
    assert c.enroll_token(token["id"])["uses_left"] == 2
    assert c.audit(target="web-01")["entries"][0]["target"] == "web-01"
    assert c.rollouts()["rollouts"] == [] and c.releases()["releases"] == []
    with pytest.raises(NotFoundError):
        c.machine("ghost")
    with pytest.raises(ValidationError):
        c.set_desired("web-01", "/tmp/not-a-store-path")


def test_http_against_a_tls_server_says_to_use_https() -> None:
    # A throwaway self-signed pair made for this test only (tests/fixtures/test-tls.*).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(FIXTURES / "test-tls.crt", FIXTURES / "test-tls.key")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        with pytest.raises(ProtocolError) as e:
            Client(f"http://127.0.0.1:{port}").status()
    finally:
        server.shutdown()
        server.server_close()
    assert f"127.0.0.1:{port} speaks TLS, not plain HTTP" in str(e.value)
    assert f"use https://127.0.0.1:{port}" in str(e.value)
