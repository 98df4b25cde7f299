"""The two axes and the filters, end to end: a real control plane, the real CLI.

For every sync value and every health value (and stale), the CLI table, `--json`,
`GET /api/v1/status` (machines and summary) and `/metrics` say the same about the
same fleet; every filter selects in CLI and API alike; a bad value is exit 2 / 422
naming the value and the allowed ones, never an empty result.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import timedelta
from typing import Any

import pytest
from conftest import ControlPlane, run_cli

from nixfleet.client import Client
from nixfleet.filters import sync_word
from nixfleet.models import Health, Lifecycle, Report, Sync, utcnow
from nixfleet.store import Store, machines

GEN_A = "/nix/store/" + "a" * 32 + "-nixos-system-a"
GEN_B = "/nix/store/" + "b" * 32 + "-nixos-system-b"


def _health(passed: bool) -> dict[str, Any]:
    check = {"name": "http", "kind": "http", "passed": passed}
    return {"all_passed": passed, "results": [check]}


@pytest.fixture
def fleet(control_plane: ControlPlane) -> ControlPlane:
    """in sync+healthy, updating+failing, failed+unknown, no desired, stale, decommissioned."""
    cp = control_plane
    tokens = {
        mid: cp.register(mid, tags)
        for mid, tags in (
            ("web-01", ["prod", "web"]),
            ("web-02", ["prod", "web", "canary"]),
            ("web-03", ["staging", "web"]),
            ("db-01", ["prod", "db"]),
            ("old-01", ["prod"]),
            ("gone-01", ["prod"]),
        )
    }

    def report(mid: str, **body: Any) -> None:
        Client(cp.url, tokens[mid]).report(mid, {"current_generation": GEN_A, **body})

    report("web-01", health=_health(True))
    report("web-02", health=_health(False))
    report("web-03")
    report("db-01", health=_health(True))
    report("gone-01")
    cp.set_desired("web-01", GEN_A)
    cp.set_desired("web-02", GEN_B)
    cp.set_desired("web-03", GEN_B)
    report("web-03", success=False, attempted_generation=GEN_B, message="switch failed")
    store = Store(cp.db)
    with store.transaction() as conn:  # quiet for an hour: stale
        machines.record_report(
            conn,
            Report(
                machine_id="old-01",
                received_at=utcnow() - timedelta(hours=1),
                current_generation=GEN_A,
                success=True,
            ),
        )
    store.close()
    cp.client().request(
        "PATCH", "/api/v1/machines/gone-01/lifecycle", {"lifecycle": "decommissioned"}
    )
    return cp


def env(cp: ControlPlane) -> dict[str, str]:
    return {"NIXFLEET_CONTROL_PLANE_URL": cp.url, "NIXFLEET_API_KEY": cp.admin_key}


def cli(cp: ControlPlane, *args: str) -> Any:
    return run_cli(*args, env=env(cp))


def api(cp: ControlPlane, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(cp.url + path, headers={"Authorization": f"Bearer {cp.admin_key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if path.startswith("/api") else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def metrics(cp: ControlPlane) -> dict[str, int]:
    _, text = api(cp, "/metrics")
    pairs = [line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")]
    return {name: int(value) for name, value in pairs}


def table_rows(stdout: str) -> dict[str, list[str]]:
    """HOST -> cells, split on runs of two spaces (cells such as `in sync` have one)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    rows = {}
    for line in lines[1:]:
        if "machines in sync" in line:
            continue
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        rows[cells[0]] = cells
    return rows


def test_cli_table_json_api_and_metrics_agree_per_sync_and_health(fleet: ControlPlane) -> None:
    _, doc = api(fleet, "/api/v1/status")
    by_id = {m["id"]: m for m in doc["machines"]}
    expected_sync = {
        "web-01": Sync.IN_SYNC,
        "web-02": Sync.UPDATING,
        "web-03": Sync.FAILED,
        "db-01": Sync.NO_DESIRED,
        "old-01": Sync.NO_DESIRED,
        "gone-01": Sync.NO_DESIRED,
    }
    expected_health = {
        "web-01": Health.HEALTHY,
        "web-02": Health.FAILING,
        "web-03": Health.UNKNOWN,
        "db-01": Health.HEALTHY,
        "old-01": Health.UNKNOWN,
        "gone-01": Health.UNKNOWN,
    }
    assert {m: Sync(v["sync"]) for m, v in by_id.items()} == expected_sync
    assert {m: Health(v["health_status"]) for m, v in by_id.items()} == expected_health
    assert [m for m, v in by_id.items() if v["stale"]] == ["old-01"]

    table = cli(fleet, "status")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:7] == [
        *("HOST", "LIFECYCLE", "CURRENT", "DESIRED", "SYNC", "HEALTH", "LAST")
    ]
    rows = table_rows(table.stdout)
    for mid, cells in rows.items():
        assert cells[4] == by_id[mid]["sync"] and cells[5] == by_id[mid]["health_status"], cells
    assert "(stale)" in " ".join(rows["old-01"])
    as_json = json.loads(cli(fleet, "status", "--json").stdout)
    assert as_json["summary"] == doc["summary"]
    assert [m["id"] for m in as_json["machines"]] == sorted(by_id)

    summary, gauges = doc["summary"], metrics(fleet)
    counted = {m: v for m, v in by_id.items() if v["lifecycle"] != "decommissioned"}
    for s in Sync:
        n = sum(1 for v in counted.values() if v["sync"] == s.value)
        assert summary[s.value.replace(" ", "_")] == n, s
        assert gauges[f'nixfleet_machines_sync{{sync="{s.value}"}}'] == n, s
    for h in Health:
        n = sum(1 for v in counted.values() if v["health_status"] == h.value)
        assert summary["by_health"][h.value] == n, h
        assert gauges[f'nixfleet_machines_health{{health="{h.value}"}}'] == n, h
    assert summary["stale"] == gauges["nixfleet_machines_stale"] == 1
    assert summary["total"] == len(counted) == 5
    last = table.stdout.strip().splitlines()[-1]
    assert last == (
        "1/5 machines in sync, 1 updating, 1 failed, 2 no desired, 1 stale; "
        "health: 2 healthy, 1 failing, 2 unknown"
    )


CASES: list[tuple[list[str], str, set[str]]] = [
    (["--sync", "failed"], "sync=failed", {"web-03"}),
    (["--sync", "in-sync"], "sync=in-sync", {"web-01"}),
    (["--sync", "updating"], "sync=updating", {"web-02"}),
    (["--sync", "no-desired"], "sync=no-desired", {"db-01", "old-01", "gone-01"}),
    (["--health", "failing"], "health=failing", {"web-02"}),
    (["--health", "healthy"], "health=healthy", {"web-01", "db-01"}),
    (["--health", "unknown"], "health=unknown", {"web-03", "old-01", "gone-01"}),
    (["--stale"], "stale=true", {"old-01"}),
    (["--lifecycle", "decommissioned"], "lifecycle=decommissioned", {"gone-01"}),
    (["web-*"], "host=web-*", {"web-01", "web-02", "web-03"}),
    (["--tags", "prod,!canary"], "tag=prod,!canary", {"web-01", "db-01", "old-01", "gone-01"}),
    (["--tags", "web", "--sync", "failed"], "tag=web&sync=failed", {"web-03"}),
    (["--tags", "nothere"], "tag=nothere", set()),
]


@pytest.mark.parametrize(("args", "query", "want"), CASES, ids=[q for _, q, _ in CASES])
def test_each_filter_selects_alike_in_cli_and_api(
    fleet: ControlPlane, args: list[str], query: str, want: set[str]
) -> None:
    for path in ("/api/v1/status", "/api/v1/machines"):
        status, doc = api(fleet, f"{path}?{query}")
        assert status == 200, doc
        assert {m["id"] for m in doc["machines"]} == want, (path, query)
    r = cli(fleet, "status", "--json", *args)
    assert r.returncode == 0, r.stderr
    assert {m["id"] for m in json.loads(r.stdout)["machines"]} == want
    listed = cli(fleet, "machines", "list", "--no-headers", *args)
    assert listed.returncode == 0, listed.stderr
    assert set(table_rows("header\n" + listed.stdout)) == want


def test_sort_and_no_headers(fleet: ControlPlane) -> None:
    r = cli(fleet, "status", "--no-headers", "--sort", "sync")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "HOST" not in r.stdout and "machines in sync" not in r.stdout
    syncs = [table_rows("h\n" + line)[line.split()[0]][4] for line in lines]
    assert syncs == sorted(syncs)
    newest = cli(fleet, "status", "--json", "--sort", "last-report", "--reverse").stdout
    ids = [m["id"] for m in json.loads(newest)["machines"]]
    assert ids[-1] == "old-01"  # the machine quiet for an hour comes last


@pytest.mark.parametrize(
    ("args", "query", "value", "allowed"),
    [
        (["--tags", "Bad Tag!"], "tag=Bad%20Tag!", "Tag!", "letters, digits"),
        (["--sync", "sideways"], "sync=sideways", "sideways", "in-sync"),
        (["--health", "meh"], "health=meh", "meh", "failing"),
        (["--lifecycle", "asleep"], "lifecycle=asleep", "asleep", "maintenance"),
        (["--sort", "size"], "sort=size", "size", "last-report"),
    ],
)
def test_bad_values_name_the_value_and_the_allowed_ones(
    fleet: ControlPlane, args: list[str], query: str, value: str, allowed: str
) -> None:
    for path in ("/api/v1/status", "/api/v1/machines"):
        status, problem = api(fleet, f"{path}?{query}")
        assert status == 422, problem
        assert value in problem["detail"] and allowed in problem["detail"], problem
    for command in (["status"], ["machines", "list"]):
        r = cli(fleet, *command, *args)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert value in r.stderr and allowed in r.stderr, r.stderr
        assert r.stdout == ""


def test_openapi_documents_the_filters_the_routes_take(fleet: ControlPlane) -> None:
    _, doc = api(fleet, "/api/v1/openapi.json")
    for path in ("/api/v1/status", "/api/v1/machines"):
        names = {p["name"] for p in doc["paths"][path]["get"]["parameters"]}
        assert names == {"tag", "lifecycle", "sync", "health", "stale", "host", "sort", "dir"}
        for name in names:  # each one is taken: a bad value is refused by name
            if name in ("tag", "host"):
                continue
            status, problem = api(fleet, f"{path}?{name}=zz-not-a-value")
            assert status == 422 and name in json.dumps(problem), (path, name, problem)
    assert [sync_word(s) for s in Sync] == ["in-sync", "updating", "failed", "no-desired"]
    assert set(Lifecycle)  # the enum the lifecycle parameter names
