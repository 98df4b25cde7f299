"""Schemathesis against the served OpenAPI document, with every role's credentials (issue 14).

A real control plane (waitress on 127.0.0.1, a real SQLite file) is probed by the
`schemathesis` CLI once per credential: a read-only key, a deploy key, an agent's
machine token (its own machine id fixed, so the report body itself is fuzzed past
authentication) and, last, the admin key (it may delete or rotate what the others
use). Every run is derandomized (`--generation-deterministic`) and bounded
(`--max-examples`, one worker, no stateful phase) so the whole test stays well under
two minutes on two cores. The checks: no 5xx (`not_a_server_error`) and every status
the document declares (`status_code_conformance`).

It cannot pass by testing nothing: each run's HAR report must hold at least a floor
of requests, reach a floor of operations, and include successes (the credential
worked); every recorded response is checked for 5xx again here, independently of
schemathesis's own verdict.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ControlPlane, new_control_plane

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@dataclass(frozen=True)
class Role:
    name: str
    max_examples: int
    min_requests: int
    min_operations: int
    phases: str = "coverage,fuzzing"
    config: str = ""  # schemathesis.toml for this run


ROLES = [
    # Authorisation turns most of these away early; random (fuzzing) cases suffice.
    Role("readonly", max_examples=5, min_requests=150, min_operations=40, phases="fuzzing"),
    Role("deploy", max_examples=5, min_requests=150, min_operations=40, phases="fuzzing"),
    # The agent's own machine: its report, desired generation and reboot lease are
    # exercised with a valid token instead of stopping at 403 for a random id.
    Role(
        "agent",
        max_examples=3,
        min_requests=80,
        min_operations=8,
        config='[parameters]\nmachine_id = "web-01"\n',
    ),
    Role("admin", max_examples=3, min_requests=600, min_operations=40),
]
AGENT_PATHS = r"^/api/v1/machines/\{machine_id\}"


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    root = tmp_path_factory.mktemp("schemathesis")
    plane = new_control_plane(root / "cp")
    plane.start()
    yield plane
    plane.stop()


def _credential(cp: ControlPlane, role: str) -> str:
    admin = cp.client()
    if role == "admin":
        return cp.admin_key
    if role == "agent":
        return cp.register("web-01", tags=("prod", "web"))
    return admin.create_key(f"st-{role}-{time.monotonic_ns()}", role)["key"]


def _run(cp: ControlPlane, role: Role, work: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    work.mkdir()
    # Written even when empty: schemathesis would otherwise look for one upwards.
    (work / "schemathesis.toml").write_text(role.config)
    har = work / "requests.har"
    args = [
        str(SCHEMATHESIS),
        "--config-file",
        str(work / "schemathesis.toml"),
        "--no-color",
        "run",
        f"{cp.url}/api/v1/openapi.json",
        "--header",
        f"Authorization: Bearer {_credential(cp, role.name)}",
        "--checks",
        "not_a_server_error,status_code_conformance",
        "--max-examples",
        str(role.max_examples),
        "--generation-deterministic",
        "--phases",
        role.phases,
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--report",
        "har",
        "--report-har-path",
        str(har),
        "--suppress-health-check",
        "all",
    ]
    if role.name == "agent":
        args += ["--include-path-regex", AGENT_PATHS]
    done = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=300, check=False)
    return done, har


@pytest.mark.long
@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_no_5xx_for_any_role(cp: ControlPlane, role: Role, tmp_path: Path) -> None:
    started = time.monotonic()
    done, har = _run(cp, role, tmp_path / role.name)
    output = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, output
    entries: list[dict[str, Any]] = json.loads(har.read_text())["log"]["entries"]
    statuses = [e["response"]["status"] for e in entries]
    server_errors = [
        (e["request"]["method"], e["request"]["url"], e["response"]["status"])
        for e in entries
        if e["response"]["status"] >= 500
    ]
    assert not server_errors, server_errors[:20]
    tested = re.search(r"^\s*Tested: (\d+)$", done.stdout, re.M)
    assert tested, output
    operations = int(tested.group(1))
    assert len(entries) >= role.min_requests, (len(entries), output)
    assert operations >= role.min_operations, (operations, output)
    assert any(200 <= s < 300 for s in statuses), "the credential never got through"
    assert f"{cp.url}/api/v1/" in entries[0]["request"]["url"]
    print(
        f"schemathesis {role.name}: {len(entries)} requests, {operations} operations, "
        f"0 5xx, {time.monotonic() - started:.1f} s"
    )
