"""Webhooks end to end: a real control-plane process, a real HTTP receiver on 127.0.0.1.

The receiver fails, hangs and recovers on command; every body it receives is checked
against the signature the way docs/webhooks.md tells receivers to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ControlPlane, run_cli, wait_until
from ports import free_port

from nixfleet import schemas

SECRET = "whsec-test-3f9a1c7d2e8b4a6f0c5d9e1b7a3f"
HOSTS = ["web-01", "web-02"]


def gen(host: str, salt: str) -> str:
    return f"/nix/store/{salt * 32}-nixos-system-{host}"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int | None  # the status sent back; None: hung until the CP gave up

    @property
    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    def signed(self, secret: str) -> bool:
        """The receiver's check, as in docs/webhooks.md."""
        ts = self.headers["X-Nixfleet-Timestamp"]
        mac = hmac.new(secret.encode(), ts.encode() + b"." + self.body, hashlib.sha256)
        expected = "sha256=" + mac.hexdigest()
        return hmac.compare_digest(expected, self.headers["X-Nixfleet-Signature"]) and (
            abs(time.time() - int(ts)) < 300
        )


@dataclass
class Receiver:
    """A webhook receiver whose behaviour the test switches: ok, fail (HTTP 500) or hang."""

    mode: str = "ok"
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/nixfleet?token=abc"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                mode = receiver.mode
                item = Received(dict(self.headers), body, None)
                receiver.received.append(item)
                if mode == "hang":
                    receiver.release.wait(30)
                    return
                item.answered = 200 if mode == "ok" else 500
                self.send_response(item.answered)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if item.answered == 500 else b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def events(self, name: str) -> list[Received]:
        return [r for r in self.received if r.event["event"] == name]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


def configure(cp: ControlPlane, tmp_path: Path, receiver: Receiver | str, **extra: Any) -> Path:
    """Restart the CP with a settings file subscribing the receiver (or URL); return it."""
    secret = tmp_path / "webhook-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    url = receiver if isinstance(receiver, str) else receiver.url
    settings = {
        "webhooks": [{"url": url, "events": ["*"], "secret_file": str(secret)}],
        "webhook_timeout": 1.0,
        "webhook_retry_initial": 0.2,
        "webhook_retry_max": 0.4,
        "reconcile_interval": 0.2,
        **extra,
    }
    path = tmp_path / "cp-settings.json"
    path.write_text(json.dumps(settings))
    cp.stop()
    cp.extra_args = ["--config", str(path)]
    cp.start()
    return path


def start_rollout(cp: ControlPlane, name: str = "web") -> str:
    client = cp.client()
    for host in HOSTS:
        if host not in {m["id"] for m in client.get("/api/v1/machines")["machines"]}:
            cp.register(host, ["web"])
    release = client.post(
        "/api/v1/releases",
        {
            "flake_ref": "github:example/fleet",
            "flake_rev": "0" * 40,
            "cache_url": "https://cache.example.com",
            "entries": [
                {"hostname": h, "store_path": gen(h, name[0]), "platform": "x86_64-linux"}
                for h in HOSTS
            ],
        },
    )
    doc = {
        "version": 1,
        "name": name,
        "release": release["id"],
        "target": {"tags": ["web"]},
        "strategy": "all-at-once",
        "health_timeout": "1h",
    }
    rollout_id: str = client.post("/api/v1/rollouts", doc)["id"]
    return rollout_id


def deliveries(cp: ControlPlane, failed: bool = False) -> list[dict[str, Any]]:
    params = {"failed": "true"} if failed else {}
    out: list[dict[str, Any]] = cp.client().get("/api/v1/webhooks/deliveries", **params)[
        "deliveries"
    ]
    return out


def test_failing_then_hanging_receiver_gets_the_event_once_it_recovers(
    control_plane: ControlPlane, tmp_path: Path, receiver: Receiver
) -> None:
    configure(control_plane, tmp_path, receiver)
    receiver.mode = "fail"
    rollout_id = start_rollout(control_plane)
    wait_until("two failed attempts", lambda: len(receiver.events("rollout.started")) >= 2)

    failing = [
        d
        for d in deliveries(control_plane, failed=True)
        if d["event"]["event"] == "rollout.started"
    ]
    assert failing and failing[0]["state"] == "pending"
    assert failing[0]["last_status"] == 500
    assert "HTTP 500" in failing[0]["last_error"]
    # No credential from the URL's query string in what the API shows.
    assert "token=abc" not in json.dumps(failing)
    cli = run_cli(
        "--control-plane-url",
        control_plane.url,
        "--api-key",
        control_plane.admin_key,
        "webhooks",
        "deliveries",
        "--failed",
    )
    assert cli.returncode == 0, cli.stderr
    assert "rollout.started" in cli.stdout and "pending" in cli.stdout and "HTTP 500" in cli.stdout

    receiver.mode = "hang"
    before = len(receiver.received)
    wait_until(
        "a hanging attempt to time out",
        lambda: any(
            a["error"] and "no answer within" in a["error"]
            for d in deliveries(control_plane)
            for a in d["history"]
        ),
    )
    assert len(receiver.received) > before

    receiver.mode = "ok"
    wait_until(
        "the delivery to succeed",
        lambda: any(
            d["state"] == "delivered" and d["event"]["event"] == "rollout.started"
            for d in deliveries(control_plane)
        ),
    )
    started = receiver.events("rollout.started")
    ids = {r.event["id"] for r in started}
    assert len(ids) == 1, "every retry carries the same event id"
    assert all(r.signed(SECRET) for r in started)
    assert not any(r.signed("another secret") for r in started)
    assert {r.body for r in started} == {started[0].body}, "every retry sends the same bytes"
    event = started[-1].event
    schemas.validate("webhook-event", event)
    assert event["rollout"] == {"id": rollout_id, "name": "web"}
    assert started[-1].headers["X-Nixfleet-Event"] == "rollout.started"
    done = next(d for d in deliveries(control_plane) if d["event"]["id"] == event["id"])
    statuses = [a["status"] for a in done["history"]]
    assert 500 in statuses and None in statuses and statuses[-1] == 200
    assert done["attempts"] == len(done["history"]) or len(done["history"]) == 20
    # The first tick started the batch: that event arrived too, once the receiver recovered.
    wait_until(
        "batch.started", lambda: any(r.answered == 200 for r in receiver.events("batch.started"))
    )
    batch = receiver.events("batch.started")[-1].event
    assert batch["detail"]["batch"] == 0 and batch["rollout"]["id"] == rollout_id
    assert SECRET not in control_plane.log.read_text()
    assert "token=abc" not in control_plane.log.read_text()


def test_kill_9_between_commit_and_delivery_delivers_after_restart(
    control_plane: ControlPlane, tmp_path: Path, receiver: Receiver
) -> None:
    configure(control_plane, tmp_path, receiver, webhook_timeout=3.0)
    receiver.mode = "hang"
    start_rollout(control_plane)
    wait_until("the first attempt to reach the receiver", lambda: bool(receiver.received))
    assert control_plane.proc is not None
    control_plane.stop(kill=True)  # SIGKILL while the attempt is in flight
    first = receiver.received[0].event
    receiver.mode = "ok"
    receiver.release.set()
    control_plane.start()
    wait_until(
        "the event to be delivered after the restart",
        lambda: any(r.answered == 200 and r.event["id"] == first["id"] for r in receiver.received),
    )
    got = next(r for r in receiver.received if r.answered == 200 and r.event["id"] == first["id"])
    assert got.signed(SECRET)
    assert got.event == first


def test_an_event_is_given_up_after_the_retry_period(
    control_plane: ControlPlane, tmp_path: Path, receiver: Receiver
) -> None:
    configure(control_plane, tmp_path, receiver, webhook_retry_for=1.5, webhook_retry_max=0.3)
    receiver.mode = "fail"
    start_rollout(control_plane)
    wait_until(
        "the delivery to be given up",
        lambda: any(
            d["state"] == "failed" and d["event"]["event"] == "rollout.started"
            for d in deliveries(control_plane, failed=True)
        ),
    )
    gave_up = next(
        d
        for d in deliveries(control_plane, failed=True)
        if d["event"]["event"] == "rollout.started"
    )
    assert (
        gave_up["attempts"] >= 2 and gave_up["finished_at"] and gave_up["next_attempt_at"] is None
    )
    count = len(receiver.events("rollout.started"))
    time.sleep(1.0)
    assert len(receiver.events("rollout.started")) == count, "no attempt after giving up"


def test_machine_failed_and_stale_events(
    control_plane: ControlPlane, tmp_path: Path, receiver: Receiver
) -> None:
    configure(control_plane, tmp_path, receiver, stale_after=1)
    token = control_plane.register("db-01", ["db"])
    agent = control_plane.client(token)
    bad = gen("db-01", "b")
    body = {
        "current_generation": gen("db-01", "a"),
        "success": False,
        "attempted_generation": bad,
        "message": "rolled back: switch failed",
    }
    agent.report("db-01", body)
    agent.report("db-01", body)  # the same failure again: no second event
    wait_until("machine.failed", lambda: bool(receiver.events("machine.failed")))
    wait_until("machine.stale", lambda: bool(receiver.events("machine.stale")))
    failed = receiver.events("machine.failed")
    assert len(failed) == 1
    event = failed[0].event
    schemas.validate("webhook-event", event)
    assert event["machine"] == "db-01" and event["rollout"] is None
    assert event["detail"]["generation"] == bad
    assert event["detail"]["message"] == "rolled back: switch failed"
    stale = receiver.events("machine.stale")
    assert [r.event["machine"] for r in stale] == ["db-01"]
    time.sleep(1.5)
    assert len(receiver.events("machine.stale")) == 1, "one event per silence"
    agent.report("db-01", {"current_generation": gen("db-01", "a")})
    wait_until("a second silence", lambda: len(receiver.events("machine.stale")) == 2)


def test_events_a_webhook_did_not_subscribe_to_are_not_sent(
    control_plane: ControlPlane, tmp_path: Path, receiver: Receiver
) -> None:
    configure(control_plane, tmp_path, receiver)
    settings = json.loads((tmp_path / "cp-settings.json").read_text())
    settings["webhooks"][0]["events"] = ["rollout.completed", "machine.failed"]
    (tmp_path / "cp-settings.json").write_text(json.dumps(settings))
    control_plane.stop()
    control_plane.start()
    start_rollout(control_plane)
    token = control_plane.register("db-01")
    control_plane.client(token).report(
        "db-01",
        {
            "current_generation": gen("db-01", "a"),
            "success": False,
            "attempted_generation": gen("db-01", "b"),
            "message": "rolled back",
        },
    )
    wait_until("machine.failed", lambda: bool(receiver.events("machine.failed")))
    time.sleep(0.5)
    assert {r.event["event"] for r in receiver.received} == {"machine.failed"}


@pytest.mark.parametrize(
    ("hook", "field"),
    [
        ({"url": "ftp://x", "secret_file": "/s"}, "webhooks[0].url"),
        ({"url": "https://x.example/h"}, "webhooks[0].secret_file"),
        (
            {"url": "https://x.example/h", "secret_file": "/s", "events": ["nope"]},
            "webhooks[0].events",
        ),
        ({"url": "https://x.example/h", "secret_file": "/s", "secret": "x"}, "webhooks[0].secret"),
    ],
)
def test_bad_webhook_settings_name_the_field(
    control_plane: ControlPlane, tmp_path: Path, hook: dict[str, Any], field: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"webhooks": [hook]}))
    control_plane.stop()
    control_plane.extra_args = ["--config", str(path)]
    with pytest.raises(RuntimeError, match=field.replace("[", r"\[").replace("]", r"\]")):
        control_plane.start(timeout=10)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def docs_receiver(secret_file: Path, port: int) -> subprocess.Popen[bytes]:
    """docs/webhooks.md's receiver, run as written: only its secret file and port are
    this test's (each replaced exactly once, so the docs cannot drift from the test)."""
    text = DOCS.read_text()
    after = text.split("A receiver in ten lines of Python:", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.count('"/run/secrets/nixfleet-webhook"') == 1 and code.count("9000") == 1
    code = code.replace('"/run/secrets/nixfleet-webhook"', repr(str(secret_file)))
    proc = subprocess.Popen([sys.executable, "-c", code.replace("9000", str(port))])

    def listening() -> bool:
        assert proc.poll() is None, "the docs' receiver exited"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until("the docs' receiver to listen", listening)
    return proc


def test_the_docs_receiver_accepts_a_real_delivery_and_refuses_a_wrong_secret(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    good_port, bad_port = free_port(), free_port()
    good, bad = f"http://127.0.0.1:{good_port}/", f"http://127.0.0.1:{bad_port}/"
    wrong = tmp_path / "another-secret"
    wrong.write_text("not-the-secret-the-control-plane-signs-with\n")
    secret = configure(control_plane, tmp_path, good).parent / "webhook-secret"
    settings = json.loads((tmp_path / "cp-settings.json").read_text())
    settings["webhooks"].append({"url": bad, "events": ["*"], "secret_file": str(secret)})
    (tmp_path / "cp-settings.json").write_text(json.dumps(settings))
    control_plane.stop()
    control_plane.start()
    receivers = [docs_receiver(secret, good_port), docs_receiver(wrong, bad_port)]
    try:
        start_rollout(control_plane)

        def answered() -> dict[str, dict[str, Any]]:
            found = {
                d["url"]: d
                for d in deliveries(control_plane)
                if d["event"]["event"] == "rollout.started" and d["last_status"]
            }
            return found if {good, bad} <= set(found) else {}

        by_url = wait_until("both receivers to have answered", answered)
    finally:
        for proc in receivers:
            proc.terminate()
            proc.wait(10)
    assert by_url[good]["state"] == "delivered" and by_url[good]["last_status"] == 204
    assert by_url[bad]["state"] == "pending" and by_url[bad]["last_status"] == 401
