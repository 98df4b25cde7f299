# ruff: noqa: F821
with subtest("machines reach v2"):
    rollout("to-v2", "v2")
    wait_rollout("to-v2", "completed")

with subtest("with the control plane stopped, agents keep their generation"):
    cp.succeed("systemctl stop nixfleet-control-plane.service")
    # The CLI says so (exit 5) and names what still holds.
    code, out = cp.execute(f"{CLI} status 2>&1")
    assert code == 5, f"nixfleet status exited {code}, expected 5:\n{out}"
    assert "last-known generation" in out, out
    code, _ = cp.execute(f"{CLI} machines list")
    assert code == 5, f"nixfleet machines list exited {code}, expected 5"
    # Several poll intervals and back-off rounds later, nothing moved.
    cp.succeed("sleep 30")
    for m in AGENTS:
        assert generation(m) == GENS[m.name]["v2"], f"{m.name} left v2"
        m.succeed("grep -qx v2 /etc/fleet-version")
        m.succeed("systemctl is-active nixfleet-agent.service fleet-app.service")

with subtest("agents catch up as soon as the control plane is back"):
    cp.succeed("systemctl start nixfleet-control-plane.service")
    cp.wait_until_succeeds("curl -sSf http://127.0.0.1:8470/health")
    since = cp.succeed("date -u +%Y-%m-%dT%H:%M:%S").strip()
    for m in AGENTS:
        # Back-off is capped at 5 s in this test: reports arrive within seconds.
        jq_until(f"/machines/{m.name}", f'.last_report_at >= "{since}"', timeout=60)
        wait_current(m, GENS[m.name]["v2"])
    cp.succeed(f"{CLI} status --json")
