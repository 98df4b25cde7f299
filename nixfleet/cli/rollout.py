"""`nixfleet rollout …` and `nixfleet deploy`: rollout files, plans, progress, control."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from nixfleet import closures, wire
from nixfleet.cli import complete
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.options import (
    HOST_LIST,
    CommaList,
    output_options,
    rollout_argument,
    tags_option,
)
from nixfleet.cli.output import Style, echo, emit_json, message, printable, style, table
from nixfleet.cli.release import register_release
from nixfleet.cli.status import poll
from nixfleet.errors import FieldError, RolloutHaltedError
from nixfleet.models import RolloutStatus, utcnow

HEALTH_COLORS: dict[str, Style] = {
    "healthy": {"fg": "green"},
    "pending": {"fg": "yellow"},
    "unhealthy": {"fg": "red"},
}
SHOW_ALL_UP_TO = 20
OUTPUT_LINES = 10  # of each failed switch's output in `rollout status` (more: machines show)


def _document(state: State, file: Path, register: bool) -> wire.RolloutDocument:
    """A validated rollout file as the API's JSON; a release TOML is registered first."""
    from nixfleet import rolloutfile  # with PyYAML: imported when used, for a fast --help

    rf = rolloutfile.load(file)
    doc, release = rolloutfile.with_release_id(rf)
    if release is not None and register:
        created = register_release(state, release)["created"]
        if created:
            message(f"registered release {release.id} from {rf.release_file}")
    return doc


def render(data: wire.Rollout, all_machines: bool = False) -> None:
    echo(
        f"rollout {data['name']} ({data['id']})  {style(data['status'], bold=True)}  "
        f"release {data['release']}  strategy {data['document']['strategy']}"
    )
    hold = data.get("hold")
    if hold and data["status"] == RolloutStatus.RUNNING.value:
        echo(f"{style(hold['kind'], bold=True)}: {hold['detail']}")  # DESIGN §11
    pruned = data.get("machines_pruned_at")
    if pruned:
        echo(
            f"condensed at {pruned}: machines counted, only those that ended unhealthy "
            "listed (rollout_detail_hours, rollout_retention_days); each machine's part is "
            "in `nixfleet machines history HOST`"
        )
    for b in data["batches"]:
        counts = {k: v for k, v in b["counts"].items() if v}
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        echo(f"batch {b['index'] + 1}  {b['status']:<9}  {b['size']} machine(s)  ({summary})")
        shown = [
            m
            for m in b["machines"]
            if all_machines or len(b["machines"]) <= SHOW_ALL_UP_TO or m["health"] != "healthy"
        ]
        if shown:
            rows = [["  " + m["id"], m["health"], m["reason"] or ""] for m in shown[:200]]
            table(
                ["  HOST", "HEALTH", "REASON"], rows, colors={1: lambda c: HEALTH_COLORS.get(c, {})}
            )
        for m in b["machines"]:
            output = m.get("failed_output")
            if output:
                echo(
                    f"  switch output of {m['id']} (last {OUTPUT_LINES} lines; all of it: "
                    f"nixfleet machines show {m['id']}):"
                )
                for line in output.splitlines()[-OUTPUT_LINES:]:
                    echo(printable("    " + line))
    for s in data.get("skipped", []):
        echo(f"skipped {s['hostname']}: {s['reason']}")


def halted(data: wire.Rollout) -> RolloutHaltedError:
    name = data["name"]
    if data["status"] == RolloutStatus.PAUSED.value:
        why = next(
            (e["detail"] for e in reversed(data["events"]) if e["kind"] == "batch-failed"), None
        )
        reason = f" ({why['unhealthy']} unhealthy, {why['allowed']} allowed)" if why else ""
        return RolloutHaltedError(
            f"rollout {name} is paused{reason}; fix the machines, then resume with:\n"
            f"  nixfleet rollout resume {name}"
        )
    if data["status"] == RolloutStatus.FAILED.value:
        return RolloutHaltedError(
            f"rollout {name} failed and its machines were reverted to their previous desired "
            "generations; fix the release and apply a rollout under a new name"
        )
    return RolloutHaltedError(f"rollout {name} was cancelled")


def progress(data: wire.Rollout) -> dict[str, str]:
    """What a log-friendly wait reports a line for when it changes (the rollout last)."""
    out: dict[str, str] = {}
    for b in data["batches"]:
        out[f"batch {b['index'] + 1}"] = b["status"]
        for m in b["machines"]:
            unhealthy = m["health"] == "unhealthy" and m["reason"]
            out[m["id"]] = f"{m['health']} ({m['reason']})" if unhealthy else m["health"]
    out[f"rollout {data['name']}"] = data["status"]
    return out


def follow(state: State, ref: str, wait: bool, interval: float) -> None:
    """Follow a rollout until it stops running; with --wait, exit by its outcome.

    On a terminal the view is redrawn; elsewhere (CI logs) it is printed once, then one
    line per change. Control-plane blips are waited out, not fatal.
    """
    client = state.client()
    tty = sys.stdout.isatty()
    seen: dict[str, str] | None = None
    while True:
        data = poll(lambda: client.rollout(ref), interval)
        if state.json:
            pass
        elif tty:
            click.clear()
            render(data)
        elif seen is None:
            render(data)
        else:
            now = utcnow().strftime("%H:%M:%S")
            for key, value in progress(data).items():
                if seen.get(key) != value:
                    echo(f"{now}  {key}: {value}")
        seen = progress(data)
        if data["status"] != RolloutStatus.RUNNING.value:
            break
        time.sleep(interval)
    if state.json:
        emit_json(data)
    if wait and data["status"] != RolloutStatus.COMPLETED.value:
        raise halted(data)


@click.group()
def rollout() -> None:
    """Validate, plan, apply and follow rollouts of a release.

    \b
    Example:
      nixfleet rollout validate rollouts/web.yaml
      nixfleet rollout apply -f rollouts/web.yaml
      nixfleet rollout status web-2026-11-27 --wait
    """


rollout_file = click.option(
    "-f",
    "--file",
    "file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Rollout file (YAML or JSON).",
)


@rollout.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def validate(file: Path) -> None:
    """Check a rollout file locally: every error with its field and line (exit 7).

    \b
    Example:
      nixfleet rollout validate rollouts/web.yaml
    """
    from nixfleet import rolloutfile

    rf = rolloutfile.load(file)
    doc = rf.document
    message(f"{file}: ok (rollout {doc['name']}, release {doc['release']}, {doc['strategy']})")


def _costs(state: State, data: wire.Plan) -> dict[str, wire.HostCost]:
    """Per planned host: closure diff, download size, reboot (nixfleet.closures, real nix)."""
    client = state.client()
    release = client.release(data["release"])
    new = {e["hostname"]: e["store_path"] for e in release["entries"]}
    known = {m["id"]: m for m in client.machines()["machines"]}
    hosts = {}
    for b in data["batches"]:
        for h in b["hosts"]:
            if h in new:
                m = known.get(h)
                hosts[h] = closures.HostGenerations(
                    m["current_generation"] if m else None,
                    m.get("booted_generation") if m else None,
                    new[h],
                )
    costs = closures.host_costs(hosts, release.get("cache_url"))
    return {
        h: {"download_bytes": c.download_bytes, "needs_reboot": c.needs_reboot, "diff": c.diff}
        for h, c in costs.items()
    }


def _size(n: int | None) -> str:
    if n is None:
        return "download size unknown"
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{size:.0f} {unit} to download" if unit == "B" else f"{size:.1f} {unit} to download"


def _render_costs(hosts: list[str], costs: dict[str, wire.HostCost]) -> None:
    for h in hosts:
        c = costs.get(h)
        if c is None:
            continue
        needed = c["needs_reboot"]
        reboot = (
            "reboot unknown" if needed is None else ("needs a reboot" if needed else "no reboot")
        )
        diff = c["diff"]
        changes = "diff unknown" if diff is None else f"{len(diff.splitlines())} change(s)"
        echo(f"  {h}: {_size(c['download_bytes'])}, {reboot}, {changes}")
        for line in (diff or "").splitlines()[:20]:
            echo(f"    {line}")


@rollout.command()
@rollout_file
@click.option(
    "--closures",
    "closures_",
    is_flag=True,
    help="Per host: closure diff, download size from the cache, reboot needed (runs nix).",
)
@output_options()
@pass_state
def plan(state: State, file: Path, closures_: bool) -> None:
    """Show the batches `apply` would create and the hosts it would skip; changes nothing.

    With --closures it also asks the local Nix store and the release's cache, per host,
    what the switch changes, how much it downloads and whether it needs a reboot.

    \b
    Example:
      nixfleet rollout plan -f rollouts/web.yaml
      nixfleet rollout plan -f rollouts/db.yaml --closures
    """
    data = state.client().plan_rollout(_document(state, file, register=False))
    costs = _costs(state, data) if closures_ else {}
    if costs:
        data["hosts"] = costs
    if state.json:
        emit_json(data)
        warn_targets(data["warnings"])
        return
    echo(
        f"rollout {data['name']}: {data['targets']} machine(s) in {len(data['batches'])} batch(es)"
    )
    for b in data["batches"]:
        echo(f"batch {b['index'] + 1} ({b['size']}): {', '.join(b['hosts'])}")
        if b.get("waiting_for_window"):  # DESIGN §11: when it can start, what holds it
            echo(f"  starts no earlier than {b.get('earliest_start')} ({b['waiting_for_window']})")
        if "held_by" in b:
            echo(f"  {b.get('at_once')} at a time: {b['held_by']}")
        _render_costs(b["hosts"], costs)
    for s in data["skipped"]:
        echo(f"skipped {s['hostname']}: {s['reason']}")
    if not data["targets"]:
        message("no machine matches the target: check `target` with `nixfleet machines list`")
    warn_targets(data["warnings"])


WARNINGS_SHOWN = 10  # per kind; --json has them all


def warn_targets(warnings: list[wire.TargetWarning]) -> None:
    """Targets that will not follow (decommissioned, stale): to stderr, --json or not."""
    for kind in ("decommissioned", "stale"):
        mine = [w for w in warnings if w["kind"] == kind]
        for w in mine[:WARNINGS_SHOWN]:
            message(f"warning: {printable(w['hostname'])} is {printable(w['detail'])}")
        if len(mine) > WARNINGS_SHOWN:
            message(
                f"warning: and {len(mine) - WARNINGS_SHOWN} more {kind} targets (--json lists them)"
            )


def submit(state: State, doc: wire.RolloutDocument, wait: bool, interval: float) -> None:
    data = state.client().apply_rollout(doc)
    if state.json and not wait:
        emit_json(data)
    else:
        verb = "created" if data["created"] else "unchanged:"
        message(f"{verb} rollout {data['name']} ({data['id']}), {len(data['batches'])} batch(es)")
        if not state.json:
            echo(data["id"])
    warn_targets(data["warnings"])
    if wait:
        follow(state, data["id"], True, interval)


@rollout.command()
@rollout_file
@click.option("--wait", is_flag=True, help="Follow until completed (exit 0) or halted (exit 8).")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between polls.")
@output_options()
@pass_state
def apply(state: State, file: Path, wait: bool, interval: float) -> None:
    """Start the rollout a file describes; applying the same file again is a no-op.

    A `release:` given as a path to a release TOML is registered first.

    \b
    Example:
      nixfleet rollout apply -f rollouts/web.yaml --wait
    """
    submit(state, _document(state, file, register=True), wait, interval)


@rollout.command("list")
@click.option(
    "--status", help="Only this status (running, paused, completed, failed, cancelled, invalid)."
)
@output_options()
@pass_state
def list_(state: State, status: str | None) -> None:
    """List rollouts, newest first, and invalid rollout files of --rollouts-dir.

    \b
    Example:
      nixfleet rollout list --status running
    """
    data = state.client().rollouts(status)
    if state.json:
        emit_json(data)
        return
    if not data["rollouts"]:
        message(
            f"no {status} rollouts"
            if status
            else "no rollouts yet: "
            "`nixfleet rollout apply -f FILE` or `nixfleet deploy --release rel-…` starts one"
        )
        return
    rows = []
    for r in data["rollouts"]:
        if "file" in r:  # an invalid rollout file
            errs = "; ".join(
                str(FieldError(e["field"], e["message"], e.get("line"))) for e in r["errors"]
            )
            rows.append([r["name"] or "-", "-", "invalid", "-", "-", f"{r['file']}: {errs}"])
            continue
        m = r["machines"]
        counts = f"{m.get('healthy', 0)}/{m.get('total', 0)} healthy" + (
            f", {m['unhealthy']} unhealthy" if m.get("unhealthy") else ""
        )
        rows.append(
            [
                r["name"] or "-",
                r["id"] or "-",
                r["status"],
                r.get("release", "-"),
                counts,
                r.get("source", "-"),
            ]
        )
    table(["NAME", "ID", "STATUS", "RELEASE", "MACHINES", "SOURCE"], rows)


@rollout.command()
@rollout_argument
@click.option("--watch", is_flag=True, help="Follow until the rollout stops running.")
@click.option("--wait", is_flag=True, help="Exit 0 when completed, 8 when paused/failed/cancelled.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between polls.")
@click.option("--all", "all_", is_flag=True, help="List healthy machines of big batches too.")
@output_options()
@pass_state
def status(
    state: State, rollout_id: str, watch: bool, wait: bool, interval: float, all_: bool
) -> None:
    """Progress per batch and per machine: pending, healthy, or unhealthy with the reason.

    With --watch or --wait: redrawn on a terminal; elsewhere (CI logs) printed once,
    then one line per change. Control-plane restarts are waited out.

    \b
    Example:
      nixfleet rollout status web-2026-11-27
      nixfleet rollout status web-2026-11-27 --wait || echo "halted"
    """
    if watch or wait:
        follow(state, rollout_id, wait, interval)
        return
    data = state.client().rollout(rollout_id)
    if state.json:
        emit_json(data)
    else:
        render(data, all_)


CONTROL_HELP = {
    "pause": "Pause a running rollout: no new batch starts.",
    "resume": "Resume a paused rollout; failed batches run again.",
    "cancel": "Cancel a rollout: no further batches; machines stay where they are.",
}


def _control(action: str) -> click.Command:
    doc = f"{CONTROL_HELP[action]}\n\n\b\nExample:\n  nixfleet rollout {action} web-2026-11-27"

    @click.command(action, help=doc)
    @rollout_argument
    @pass_state
    def command(state: State, rollout_id: str) -> None:
        data = state.client().control_rollout(rollout_id, action)
        message(f"rollout {data['name']} ({data['id']}): {data['status']}")

    return command


for _action in CONTROL_HELP:
    rollout.add_command(_control(_action))


# --- deploy -------------------------------------------------------------------------


@click.command()
@click.option(
    "--release",
    "release_ref",
    required=True,
    shell_complete=complete.release_items,
    help="Release id, or a release TOML file.",
)
@tags_option("Machines carrying ALL these tags (comma-separated).")
@click.option("--hosts", type=HOST_LIST, default="", help="Plus these hosts (comma-separated).")
@click.option(
    "--strategy",
    type=click.Choice(["canary", "staged", "all-at-once"]),
    default="canary",
    show_default=True,
    help="canary: one machine first; staged: --batch-size batches; all-at-once: one batch.",
)
@click.option(
    "--batch-size",
    type=CommaList(),
    default="",
    help="Batch sizes: counts or percentages, e.g. 1,25%,100%.",
)
@click.option("--failure-threshold", default="0", show_default=True, help="Per batch: N or P%.")
@click.option(
    "--on-failure",
    type=click.Choice(["pause", "revert"]),
    default="pause",
    show_default=True,
    help="When a batch fails: pause, or revert every touched machine.",
)
@click.option("--health-timeout", default="5m", show_default=True, help="Seconds or 30s/5m/1h.")
@click.option(
    "--soak", default="0s", show_default=True, help="How long a machine must stay healthy."
)
@click.option(
    "--name", help="Rollout name (default: derived from the options, so re-running is a no-op)."
)
@click.option("--wait", is_flag=True, help="Follow until completed (exit 0) or halted (exit 8).")
@click.option(
    "--interval", default=2.0, show_default=True, help="Seconds between polls with --wait."
)
@output_options()
@pass_state
def deploy(
    state: State,
    release_ref: str,
    tags: list[str],
    hosts: list[str],
    strategy: str,
    batch_size: list[str],
    failure_threshold: str,
    on_failure: str,
    health_timeout: str,
    soak: str,
    name: str | None,
    wait: bool,
    interval: float,
) -> None:
    """Roll a release out to machines in one command (the rollout file built from flags).

    \b
    Example:
      nixfleet deploy --release rel-3f2a9c1d7e4b --tags web,prod --strategy staged \\
        --batch-size 1,25%,100% --failure-threshold 10% --health-timeout 5m --wait
    """
    from nixfleet import deploy as deploy_lib
    from nixfleet import flake

    release_id = release_ref
    if release_ref.endswith(".toml"):
        rel = flake.read_toml(Path(release_ref))
        register_release(state, rel)
        release_id = rel.id
    options = deploy_lib.DeployOptions(
        release=release_id,
        tags=tags,
        hosts=hosts,
        strategy=strategy,
        batch_size=batch_size,
        failure_threshold=failure_threshold,
        on_failure=on_failure,
        health_timeout=health_timeout,
        soak=soak,
        name=name,
    )
    doc = deploy_lib.document(options)
    submit(state, doc, wait, interval)
