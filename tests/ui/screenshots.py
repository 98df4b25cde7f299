"""Screenshots of every dashboard page for docs/dashboard.md (run by hand, not in CI).

    .venv/bin/python tests/ui/screenshots.py        # writes docs/images/dashboard-*.png

Starts a throwaway control plane with the fleet of tests/ui/fleetdata.py, lets the
rollout's canary deploy (one simulated agent switches), and photographs each page in
Debian's headless chromium at 1440 px wide.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, as under pytest

from nixfleet.client import Client
from ui import fleetdata
from ui.browser import chromium, login, shots_dir
from ui.conftest import start_cp


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else shots_dir()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nixfleet-shots-") as tmp:
        cp, keys = start_cp(Path(tmp))
        try:
            tokens = fleetdata.build(cp.url, keys.admin)
            api = Client(cp.url, keys.admin)
            rid = api.get("/api/v1/rollouts")["rollouts"][0]["id"]
            # The canary switches and reports healthy: batch 1 done, batch 2 deploying.
            canary = "web-01"
            agent = Client(cp.url, tokens[canary])
            body = {
                "current_generation": fleetdata.gen(canary, "a"),
                "tags": ["web", "prod"],
                "health": fleetdata.health(("sshd.service", True, "active")),
            }
            deadline = time.monotonic() + 30
            desired = None
            while desired is None and time.monotonic() < deadline:
                desired = agent.report(canary, body)["desired_generation"]
                time.sleep(0.2)
            Client(cp.url, tokens[canary]).report(
                canary,
                {
                    "current_generation": desired,
                    "tags": ["web", "prod"],
                    "message": "switched",
                    "health": fleetdata.health(("sshd.service", True, "active")),
                },
            )
            with chromium() as browser:
                page = browser.new_page()
                page.goto(f"{cp.url}/ui/login")
                page.screenshot(path=str(out / "dashboard-login.png"))
                login(page, cp.url, keys.admin)
                page.wait_for_timeout(3000)  # the reconciler starts batch 2
                shots = [
                    ("fleet", "/ui/"),
                    ("fleet-filtered", "/ui/?tags=prod%2C%21web&sort=health"),
                    ("machine", "/ui/machines/db-02"),
                    ("rollouts", "/ui/rollouts"),
                    ("rollout", f"/ui/rollouts/{rid}"),
                    ("audit", "/ui/audit"),
                ]
                for name, path in shots:
                    page.goto(cp.url + path)
                    page.screenshot(path=str(out / f"dashboard-{name}.png"), full_page=True)
                    print(out / f"dashboard-{name}.png")
        finally:
            cp.stop()


if __name__ == "__main__":
    main()
