"""`nixfleet-agent`: parse flags, load the config, run the loop.

Thin on purpose (DESIGN §2 rule 1): everything the agent does lives in `loop`,
`activate`, `health` and `nix`, which tests drive directly. Errors become exit
codes in one place, `nixfleet.entrypoint.run` (the command's class).
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Any

import click

from nixfleet import __version__
from nixfleet.agent.config import load_config
from nixfleet.agent.loop import Agent
from nixfleet.entrypoint import EXIT_INTERRUPTED, Program


@click.command(
    "nixfleet-agent", cls=Program, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="JSON config file (the NixOS module writes it).",
)
@click.option("--control-plane-url", help="Control plane base URL.")
@click.option("--machine-id", help="This machine's id (default: hostname).")
@click.option("--token-file", help="File holding the machine token.")
@click.option("--profile", help="System profile (default /nix/var/nix/profiles/system).")
@click.option("--current-system", help="Current-system link (default /run/current-system).")
@click.option("--state-dir", help="State directory (default /var/lib/nixfleet-agent).")
@click.option("--cache-url", help="Binary cache used when the control plane names none.")
@click.option(
    "--trusted-public-key",
    "trusted_public_keys",
    multiple=True,
    help="Public key closures must be signed with (repeatable).",
)
@click.option("--poll-interval", type=float, help="Seconds between polls (default 60).")
@click.option(
    "--dry-run",
    is_flag=True,
    default=None,
    help="Say what would be done; change nothing (no reports either).",
)
@click.option(
    "--allow-insecure",
    is_flag=True,
    default=None,
    help="Allow plain http:// to a non-loopback control plane.",
)
@click.option("--once", is_flag=True, help="Run one cycle and exit with its status.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(__version__, prog_name="nixfleet-agent")
def main(config_file: str | None, once: bool, verbose: bool, **flags: Any) -> int:
    """Keep this NixOS machine at the generation the nixfleet control plane wants.

    Normally started by the NixOS module (services.nixfleet-agent) with --config.

    \b
    Example:
      nixfleet-agent --config /etc/nixfleet-agent.json
      nixfleet-agent --config /etc/nixfleet-agent.json --once --dry-run -v
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    agent = Agent(load_config(config_file, flags))
    interrupted: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("received signal %d", signum)
        if signum == signal.SIGINT:
            interrupted.append(signum)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = agent.run(once=once)
    # SIGTERM is how systemd stops the agent (exit by status); Ctrl-C is an interruption.
    return EXIT_INTERRUPTED if interrupted else int(status)


if __name__ == "__main__":
    main()
