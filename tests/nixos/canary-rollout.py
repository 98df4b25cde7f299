# ruff: noqa: F821
with subtest("a canary rollout reaches every machine and completes"):
    rollout("to-v2", "v2")
    wait_rollout("to-v2", "completed")
    for m in AGENTS:
        assert generation(m) == GENS[m.name]["v2"], f"{m.name} is not on v2"
        m.succeed("grep -qx v2 /etc/fleet-version")
        wait_current(m, GENS[m.name]["v2"])
        # The switch did not take the agent down with it.
        m.succeed("systemctl is-active nixfleet-agent.service")

with subtest("the CLI shows desired == current for the whole fleet"):
    status = json.loads(cp.succeed(f"{CLI} status --json"))
    cp.log(json.dumps(status, indent=2))
    for m in AGENTS:
        machine = api("GET", f"/machines/{m.name}")
        assert machine["desired_generation"] == machine["current_generation"], machine
