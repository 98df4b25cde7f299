# Helpers for the nixfleet VM tests; ADMIN_KEY and SYSTEM come from common.nix,
# the machines (cp, agent1, agent2) from the test driver.
# ruff: noqa: F821
import json
import shlex

API = "http://127.0.0.1:8470/api/v1"
# The nixfleet CLI on the cp node, as an operator with the admin key.
CLI = f"NIXFLEET_CONTROL_PLANE_URL=http://127.0.0.1:8470 NIXFLEET_API_KEY={ADMIN_KEY} nixfleet"
AGENTS = [agent1, agent2]


def api(method, path, body=None):
    """Call the control plane's API as admin, from the cp node."""
    cmd = [
        "curl",
        "-sS",
        "--fail-with-body",
        "-X",
        method,
        "-H",
        f"Authorization: Bearer {ADMIN_KEY}",
        "-H",
        "Content-Type: application/json",
    ]
    if body is not None:
        cmd += ["--data", json.dumps(body)]
    return json.loads(cp.succeed(shlex.join([*cmd, API + path])))


def jq_until(path, expr, timeout=300):
    """Wait until the JSON at API path satisfies the jq expression."""
    cp.wait_until_succeeds(
        f"curl -sSf -H 'Authorization: Bearer {ADMIN_KEY}' {API}{path} | jq -e {shlex.quote(expr)}",
        timeout=timeout,
    )


def generation(machine, link="/run/current-system"):
    return machine.succeed(f"readlink -f {link}").strip()


def wait_current(machine, gen):
    """Wait until the control plane has the machine's report of gen."""
    jq_until(f"/machines/{machine.name}", f'.current_generation == "{gen}"')


def release(variant):
    """Register a release putting every agent on one of its generations."""
    entries = [
        {
            "hostname": m.name,
            "store_path": GENS[m.name][variant],
            "platform": SYSTEM,
            "tags": ["test"],
        }
        for m in AGENTS
    ]
    body = {
        "flake_ref": "path:/vm-test",
        "flake_rev": variant,
        "cache_url": None,
        "entries": entries,
    }
    return api("POST", "/releases", body)["id"]


def rollout(name, variant, on_failure="pause"):
    """Canary rollout of a release to the machines tagged web."""
    api(
        "POST",
        "/rollouts",
        {
            "version": 1,
            "name": name,
            "release": release(variant),
            "target": {"tags": ["web"]},
            "strategy": "canary",
            "batches": [1, "100%"],
            "failure_threshold": 0,
            "on_failure": on_failure,
            "health_timeout": "3m",
            "soak": "5s",
        },
    )


def wait_rollout(name, state, timeout=600):
    jq_until(f"/rollouts/{name}", f'.state == "{state}"', timeout)


start_all()
cp.wait_for_unit("nixfleet-control-plane.service")
cp.wait_until_succeeds("curl -sSf http://127.0.0.1:8470/health")

GENS: dict[str, dict[str, str]] = {}
with subtest("agents enroll and report their booted generation"):
    for m in AGENTS:
        m.wait_for_unit("multi-user.target")
        GENS[m.name] = {
            "v1": generation(m),
            "v2": generation(m, "/run/current-system/specialisation/v2"),
            "broken": generation(m, "/run/current-system/specialisation/broken"),
        }
        token = api("POST", "/machines", {"id": m.name, "tags": ["test"], "issue_token": True})[
            "token"
        ]
        m.succeed(f"install -m 0600 /dev/stdin /var/lib/nixfleet-token <<< {shlex.quote(token)}")
        m.succeed("systemctl restart nixfleet-agent.service")
        m.wait_for_unit("nixfleet-agent.service")
    for m in AGENTS:
        wait_current(m, GENS[m.name]["v1"])
        # Tags from services.nixfleet-agent.tags are synced on every poll.
        jq_until(f"/machines/{m.name}", '.tags | index("web") != null')
