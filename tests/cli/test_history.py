"""`nixfleet machines history` as a new user meets it: real CLI, real control plane, HTTP polls."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import ControlPlane, run_cli

from nixfleet.client import Client
from nixfleet.errors import ValidationError


def gen(n: int) -> str:
    return f"/nix/store/{str(n) * 32}-nixos-system-web-03"


def checks(*failing: str) -> dict[str, Any]:
    names = ("nginx", "disk")
    return {
        "all_passed": not failing,
        "results": [
            {"name": n, "kind": "systemd", "passed": n not in failing, "duration_ms": 4}
            for n in names
        ],
    }


class Agent:
    """web-03's agent, as far as the control plane can tell: its reports over HTTP."""

    def __init__(self, cp: ControlPlane, token: str) -> None:
        self.client = Client(cp.url, token)
        self.current = gen(0)
        self.tags = ["web"]
        self.health = checks()
        self.failure: dict[str, Any] = {}
        self.polls = 0

    def poll(self, n: int = 1) -> None:
        for _ in range(n):
            body = {
                "current_generation": self.current,
                "tags": self.tags,
                "health": self.health,
                "message": self.failure.get("message", "running"),
                "uptime_seconds": self.polls,
                "agent_version": "0.1.0",
                **{k: v for k, v in self.failure.items() if k != "message"},
            }
            self.client.report("web-03", body)
            self.polls += 1


def cli(cp: ControlPlane, *args: str) -> str:
    r = run_cli(*args, env={"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.admin_key})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_history_tells_the_story_and_nothing_else(control_plane: ControlPlane) -> None:
    cp = control_plane
    token = cli(cp, "machines", "register", "web-03", "--tags", "prod", "--issue-token").strip()
    agent = Agent(cp, token)
    agent.poll(100)
    cli(cp, "machines", "set-desired", "web-03", gen(1))  # deploy v1
    agent.poll(5)  # fetching
    agent.current = gen(1)
    agent.poll(150)
    cli(cp, "machines", "set-desired", "web-03", gen(2))  # deploy v2: it fails
    agent.failure = {
        "success": False,
        "attempted_generation": gen(2),
        "message": "rolled back: health checks failed: nginx",
    }
    agent.poll(150)  # the agent says so on every poll until the desired generation changes
    cli(cp, "machines", "set-desired", "web-03", gen(3))  # deploy v3
    agent.failure = {}
    agent.current = gen(3)
    agent.poll(150)
    agent.health = checks("nginx")  # a health check flaps
    agent.poll(100)
    agent.health = checks()
    agent.poll(100)
    agent.tags = ["web", "eu"]  # the NixOS config gained a tag
    agent.poll(100)
    cli(cp, "machines", "tag", "web-03", "canary")
    agent.poll(50)
    cli(cp, "machines", "set-lifecycle", "web-03", "maintenance")
    agent.poll(95)
    assert agent.polls == 1000

    events = json.loads(cli(cp, "machines", "history", "web-03", "--json"))
    operator = "key:test-admin"
    story = [
        ("lifecycle", "agent", None, None),  # pending -> active: the first report
        ("generation", "agent", None, gen(0)),
        ("tags", "agent", None, None),
        ("desired", operator, None, gen(1)),
        ("generation", "agent", gen(0), gen(1)),
        ("desired", operator, gen(1), gen(2)),
        ("rolled-back", "agent", None, gen(2)),
        ("desired", operator, gen(2), gen(3)),
        ("generation", "agent", gen(1), gen(3)),
        ("health", "agent", None, None),
        ("health", "agent", None, None),
        ("tags", "agent", None, None),
        ("tags", operator, None, None),
        ("lifecycle", operator, None, None),
    ]
    assert [(e["kind"], e["source"], e["previous"], e["generation"]) for e in events] == story
    times = [e["at"] for e in events]
    assert times == sorted(times)
    assert events[6]["detail"] == {"reason": "rolled back: health checks failed: nginx"}
    assert [e["detail"]["status"] for e in events[9:11]] == ["failing", "healthy"]
    assert events[9]["detail"]["newly_failing"] == ["nginx"]
    assert events[10]["detail"]["recovered"] == ["nginx"]
    assert events[11]["detail"] == {"tag_source": "agent", "added": ["eu"], "removed": []}
    assert events[12]["detail"] == {"tag_source": "operator", "added": ["canary"], "removed": []}
    assert events[13]["detail"] == {"from": "active", "to": "maintenance"}

    # The table says the same, one line per event, in order.
    table = cli(cp, "machines", "history", "web-03", "--since", "1h").splitlines()
    assert table[0].split() == ["TIME", "KIND", "SOURCE", "CHANGE"]
    assert [line.split()[1] for line in table[1:]] == [s[0] for s in story]
    assert "generation 1111111-nixos-system-web-03 -> 3333333-nixos-system-web-03" in table[9]
    assert "rolled back: health checks failed: nginx" in table[7]
    assert "failing: nginx" in table[10] and "passing again: nginx" in table[11]

    # Filters; `machines show` ends with the latest events.
    only = json.loads(cli(cp, "machines", "history", "web-03", "--kind", "rolled-back", "--json"))
    assert [e["id"] for e in only] == [events[6]["id"]]
    show = cli(cp, "machines", "show", "web-03").splitlines()
    assert "lifecycle active -> maintenance" in show[-1] and operator in show[-1]


def test_history_filters_are_checked(control_plane: ControlPlane) -> None:
    token = control_plane.register("web-04")
    Client(control_plane.url, token).report("web-04", {"current_generation": gen(0)})
    admin = control_plane.client()
    with pytest.raises(ValidationError) as bad:
        admin.get("/api/v1/machines/web-04/history", kind="generations")
    assert "generations" in str(bad.value) and "rolled-back" in str(bad.value)
    for name, value in [("since", "yesterday"), ("limit", "0"), ("after", "-1")]:
        with pytest.raises(ValidationError, match=name):
            admin.get("/api/v1/machines/web-04/history", **{name: value})
    # the agent may read its own history, not another machine's
    own = Client(control_plane.url, token).get("/api/v1/machines/web-04/history")
    assert [e["kind"] for e in own["events"]] == ["lifecycle", "generation"]
    r = run_cli(
        "machines",
        "history",
        "web-04",
        "--kind",
        "nope",
        env={"NIXFLEET_CONTROL_PLANE_URL": control_plane.url},
    )
    assert r.returncode == 2 and "nope" in r.stderr
