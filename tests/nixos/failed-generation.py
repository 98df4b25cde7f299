# ruff: noqa: F821
with subtest("a generation failing its health check is rolled back and pauses the rollout"):
    rollout("to-broken", "broken", on_failure="pause")
    wait_rollout("to-broken", "paused")
    # The canary tried it, failed fleet-app.service, and went back to v1; the
    # other machine was never asked to switch.
    for m in AGENTS:
        wait_current(m, GENS[m.name]["v1"])
        assert generation(m) == GENS[m.name]["v1"], f"{m.name} is not back on v1"
        m.succeed("grep -qx v1 /etc/fleet-version")
        m.succeed("systemctl is-active fleet-app.service nixfleet-agent.service")
    failed = [
        m.name
        for m in AGENTS
        if api("GET", f"/machines/{m.name}")["failed_generation"] == GENS[m.name]["broken"]
    ]
    assert len(failed) == 1, f"expected exactly the canary to have failed, got {failed}"

with subtest("the failed generation is not retried"):
    canary = next(m for m in AGENTS if m.name == failed[0])
    switches = canary.succeed("journalctl -o cat -u 'nixfleet-switch-*' | grep -c . || true")
    canary.succeed("sleep 15")  # three poll intervals
    assert generation(canary) == GENS[canary.name]["v1"]
    again = canary.succeed("journalctl -o cat -u 'nixfleet-switch-*' | grep -c . || true")
    assert switches == again, "the agent switched again after the rollback"
    machine = api("GET", f"/machines/{canary.name}")
    assert machine["failed_generation"] == GENS[canary.name]["broken"], machine
