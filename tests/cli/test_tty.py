"""Colours: only on a terminal, never with NO_COLOR — checked on a real pseudo-terminal."""

from __future__ import annotations

import os

from conftest import ControlPlane, run_on_tty

GEN = "/nix/store/" + "a" * 32 + "-nixos-system-web-01"


def test_colour_on_a_tty_and_never_with_no_color(control_plane: ControlPlane) -> None:
    control_plane.register("web-01")
    control_plane.set_desired("web-01", GEN)
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env |= {
        "NIXFLEET_CONTROL_PLANE_URL": control_plane.url,
        "NIXFLEET_API_KEY": control_plane.admin_key,
    }
    coloured = run_on_tty(["status"], env)
    assert "updating" in coloured and "\x1b[" in coloured
    plain = run_on_tty(["status"], env | {"NO_COLOR": "1"})
    assert "updating" in plain and "\x1b[" not in plain
