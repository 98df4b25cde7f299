"""What a rollout costs each host (DESIGN §11, `rollout plan --closures`), on real Nix.

Per host: the closure diff between its current generation and the release's
(`nix store diff-closures`), the download size of the release's closure from the
cache (`nix path-info -S --store <cache>`), and whether it will need a reboot (the
release's kernel, initrd and kernel modules against the host's booted system, as
autoUpgrade compares them). Each distinct generation pair is asked once, however
many hosts share it. What the local store cannot answer (a host's current
generation was never built or fetched here) is reported as unknown, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nixfleet import nix
from nixfleet.errors import CommandError
from nixfleet.policy.reboot import needs_reboot


@dataclass(frozen=True)
class HostCost:
    diff: str | None  # diff-closures output ("" for no version change); None: unknown
    download_bytes: int | None  # the release closure's NAR size in the cache; None: unknown
    needs_reboot: bool | None  # None: the booted (or new) system is not in the local store


@dataclass(frozen=True)
class HostGenerations:
    current: str | None
    booted: str | None
    new: str


def host_costs(
    hosts: Mapping[str, HostGenerations], cache_url: str | None, env: nix.Env = None
) -> dict[str, HostCost]:
    diffs: dict[tuple[str, str], str | None] = {}
    sizes: dict[str, int | None] = {}
    reboots: dict[tuple[str, str], bool | None] = {}
    valid: dict[str, bool] = {}

    def local(path: str | None) -> bool:
        if path is None:
            return False
        if path not in valid:
            valid[path] = nix.is_valid(path, env=env)
        return valid[path]

    out: dict[str, HostCost] = {}
    for host, g in sorted(hosts.items()):
        if g.new not in sizes:
            sizes[g.new] = nix.closure_size(g.new, store=cache_url, env=env)
            if sizes[g.new] is None and cache_url is not None and local(g.new):
                sizes[g.new] = nix.closure_size(g.new, env=env)
        diff: str | None = None
        if g.current is not None and local(g.current) and local(g.new):
            key = (g.current, g.new)
            if key not in diffs:
                try:
                    diffs[key] = nix.diff_closures(g.current, g.new, env=env)
                except CommandError:
                    diffs[key] = None
            diff = diffs[key]
        reboot: bool | None = None
        if g.booted is not None and local(g.booted) and local(g.new):
            rkey = (g.booted, g.new)
            if rkey not in reboots:
                reboots[rkey] = needs_reboot(nix.boot_links(g.booted), nix.boot_links(g.new))
            reboot = reboots[rkey]
        out[host] = HostCost(diff, sizes[g.new], reboot)
    return out
