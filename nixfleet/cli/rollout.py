"""`nixfleet rollout …` and `nixfleet deploy`: rollout files, plans, progress, control."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from nixfleet import closures, flake, rolloutfile, schemas
from nixfleet.cli.context import State, pass_state
from nixfleet.cli.output import emit_json, message, style, table
from nixfleet.cli.release import register_release
from nixfleet.errors import FieldError, RolloutHaltedError, ValidationError
from nixfleet.models import RolloutStatus

HEALTH_COLORS = {
    "healthy": {"fg": "green"},
    "pending": {"fg": "yellow"},
    "unhealthy": {"fg": "red"},
}
SHOW_ALL_UP_TO = 20


def _path(ref: str, suffix: str = "") -> str:
    return f"/api/v1/rollouts/{quote(ref, safe='')}{suffix}"


def _document(state: State, file: Path, register: bool) -> dict[str, Any]:
    """A validated rollout file as the API's JSON; a release TOML is registered first."""
    rf = rolloutfile.load(file)
    doc, release = rolloutfile.with_release_id(rf)
    if release is not None and register:
        created = register_release(state, release)["created"]
        if created:
            message(f"registered release {release.id} from {rf.release_file}")
    return doc


def render(data: dict[str, Any], all_machines: bool = False) -> None:
    click.echo(
        f"rollout {data['name']} ({data['id']})  {style(data['status'], bold=True)}  "
        f"release {data['release']}  strategy {data['document']['strategy']}"
    )
    hold = data.get("hold")
    if hold and data["status"] == RolloutStatus.RUNNING.value:
        click.echo(f"{style(hold['kind'], bold=True)}: {hold['detail']}")
    for b in data["batches"]:
        counts: dict[str, int] = {}
        for m in b["machines"]:
            counts[m["health"]] = counts.get(m["health"], 0) + 1
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        click.echo(f"batch {b['index'] + 1}  {b['status']:<9}  {b['size']} machine(s)  ({summary})")
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
    for s in data.get("skipped", []):
        click.echo(f"skipped {s['hostname']}: {s['reason']}")


def halted(data: dict[str, Any]) -> RolloutHaltedError:
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


def follow(state: State, ref: str, wait: bool, interval: float, json_: bool) -> None:
    """Redraw until the rollout stops running; with --wait, exit by its outcome."""
    while True:
        data = state.client().get(_path(ref))
        if not json_:
            if not wait:
                click.clear()
            render(data)
        if data["status"] != RolloutStatus.RUNNING.value:
            break
        time.sleep(interval)
    if json_:
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
    rf = rolloutfile.load(file)
    doc = rf.document
    message(f"{file}: ok (rollout {doc['name']}, release {doc['release']}, {doc['strategy']})")


def _costs(state: State, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per planned host: closure diff, download size, reboot (nixfleet.closures, real nix)."""
    client = state.client()
    release = client.get(f"/api/v1/releases/{quote(data['release'], safe='')}")
    new = {e["hostname"]: e["store_path"] for e in release["entries"]}
    known = {m["id"]: m for m in client.get("/api/v1/machines")["machines"]}
    hosts = {
        h: closures.HostGenerations(
            known.get(h, {}).get("current_generation"),
            known.get(h, {}).get("booted_generation"),
            new[h],
        )
        for b in data["batches"]
        for h in b["hosts"]
        if h in new
    }
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


@rollout.command()
@rollout_file
@click.option(
    "--closures",
    "closures_",
    is_flag=True,
    help="Per host: closure diff, download size from the cache, reboot needed (runs nix).",
)
@click.option("--json", "json_", is_flag=True, help="JSON output.")
@pass_state
def plan(state: State, file: Path, closures_: bool, json_: bool) -> None:
    """Show the batches `apply` would create and the hosts it would skip; changes nothing.

    With --closures it also asks the local Nix store and the release's cache, per host,
    what the switch changes, how much it downloads and whether it needs a reboot.

    \b
    Example:
      nixfleet rollout plan -f rollouts/web.yaml
      nixfleet rollout plan -f rollouts/db.yaml --closures
    """
    data = state.client().post("/api/v1/rollouts/plan", _document(state, file, register=False))
    costs = _costs(state, data) if closures_ else {}
    if costs:
        data["hosts"] = costs
    if json_ or state.json:
        emit_json(data)
        return
    click.echo(
        f"rollout {data['name']}: {data['targets']} machine(s) in {len(data['batches'])} batch(es)"
    )
    for b in data["batches"]:
        click.echo(f"batch {b['index'] + 1} ({b['size']}): {', '.join(b['hosts'])}")
        if b.get("waiting_for_window"):  # DESIGN §11: when it can start, what holds it
            click.echo(
                f"  starts no earlier than {b['earliest_start']} ({b['waiting_for_window']})"
            )
        if b.get("held_by"):
            click.echo(f"  {b['at_once']} at a time: {b['held_by']}")
        for h in b["hosts"]:
            c = costs.get(h)
            if c is None:
                continue
            reboot = {True: "needs a reboot", False: "no reboot"}.get(
                c["needs_reboot"], "reboot unknown"
            )
            diff = c["diff"]
            changes = "diff unknown" if diff is None else f"{len(diff.splitlines())} change(s)"
            click.echo(f"  {h}: {_size(c['download_bytes'])}, {reboot}, {changes}")
            for line in (diff or "").splitlines()[:20]:
                click.echo(f"    {line}")
    for s in data["skipped"]:
        click.echo(f"skipped {s['hostname']}: {s['reason']}")


def submit(state: State, doc: dict[str, Any], json_: bool, wait: bool, interval: float) -> None:
    data = state.client().post("/api/v1/rollouts", doc)
    if json_ and not wait:
        emit_json(data)
    else:
        verb = "created" if data["created"] else "unchanged:"
        message(f"{verb} rollout {data['name']} ({data['id']}), {len(data['batches'])} batch(es)")
        click.echo(data["id"])
    if wait:
        follow(state, data["id"], True, interval, json_)


@rollout.command()
@rollout_file
@click.option("--wait", is_flag=True, help="Follow until completed (exit 0) or halted (exit 8).")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between polls.")
@click.option("--json", "json_", is_flag=True, help="JSON output.")
@pass_state
def apply(state: State, file: Path, wait: bool, interval: float, json_: bool) -> None:
    """Start the rollout a file describes; applying the same file again is a no-op.

    A `release:` given as a path to a release TOML is registered first.

    \b
    Example:
      nixfleet rollout apply -f rollouts/web.yaml --wait
    """
    submit(state, _document(state, file, register=True), json_ or state.json, wait, interval)


@rollout.command("list")
@click.option(
    "--status", help="Only this status (running, paused, completed, failed, cancelled, invalid)."
)
@click.option("--json", "json_", is_flag=True, help="JSON output.")
@pass_state
def list_(state: State, status: str | None, json_: bool) -> None:
    """List rollouts, newest first, and invalid rollout files of --rollouts-dir.

    \b
    Example:
      nixfleet rollout list --status running
    """
    data = state.client().get("/api/v1/rollouts", status=status)
    if json_ or state.json:
        emit_json(data)
        return
    rows = []
    for r in data["rollouts"]:
        if r["status"] == "invalid":
            errs = "; ".join(
                str(FieldError(e["field"], e["message"], e.get("line"))) for e in r["errors"]
            )
            rows.append([r["name"] or "-", "-", "invalid", "-", "-", f"{r['file']}: {errs}"])
            continue
        m = r["machines"]
        progress = f"{m['healthy']}/{m['total']} healthy" + (
            f", {m['unhealthy']} unhealthy" if m["unhealthy"] else ""
        )
        rows.append([r["name"], r["id"], r["status"], r["release"], progress, r["source"]])
    table(["NAME", "ID", "STATUS", "RELEASE", "MACHINES", "SOURCE"], rows)


@rollout.command()
@click.argument("rollout_id")
@click.option("--watch", is_flag=True, help="Redraw until the rollout stops running.")
@click.option("--wait", is_flag=True, help="Exit 0 when completed, 8 when paused/failed/cancelled.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between polls.")
@click.option("--all", "all_", is_flag=True, help="List healthy machines of big batches too.")
@click.option("--json", "json_", is_flag=True, help="JSON output.")
@pass_state
def status(
    state: State, rollout_id: str, watch: bool, wait: bool, interval: float, all_: bool, json_: bool
) -> None:
    """Progress per batch and per machine: pending, healthy, or unhealthy with the reason.

    \b
    Example:
      nixfleet rollout status web-2026-11-27
      nixfleet rollout status web-2026-11-27 --wait || echo "halted"
    """
    if watch or wait:
        follow(state, rollout_id, wait, interval, json_ or state.json)
        return
    data = state.client().get(_path(rollout_id))
    if json_ or state.json:
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
    @click.argument("rollout_id")
    @pass_state
    def command(state: State, rollout_id: str) -> None:
        data = state.client().post(_path(rollout_id, f"/{action}"))
        message(f"rollout {data['name']} ({data['id']}): {data['status']}")

    return command


for _action in CONTROL_HELP:
    rollout.add_command(_control(_action))


# --- deploy -------------------------------------------------------------------------


def _count_or_text(value: str) -> int | str:
    value = value.strip()
    return int(value) if value.isdigit() else value


def deploy_document(
    release: str,
    tags: list[str],
    hosts: list[str],
    strategy: str,
    batch_size: str | None,
    failure_threshold: str,
    on_failure: str,
    health_timeout: str,
    soak: str,
    name: str | None,
) -> dict[str, Any]:
    """The rollout document `deploy`'s flags describe (validated like a file)."""
    target: dict[str, Any] = {}
    if tags:
        target["tags"] = tags
    if hosts:
        target["hosts"] = hosts
    doc: dict[str, Any] = {
        "version": 1,
        "name": name or "",
        "release": release,
        "target": target,
        "strategy": strategy,
        "failure_threshold": _count_or_text(failure_threshold),
        "on_failure": on_failure,
        "health_timeout": _count_or_text(health_timeout),
        "soak": _count_or_text(soak),
    }
    if batch_size:
        doc["batches"] = [_count_or_text(b) for b in batch_size.split(",") if b.strip()]
    if not name:
        # Same flags, same name: running the same deploy twice is a no-op.
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:8]
        doc["name"] = f"deploy-{release.removeprefix('rel-')}-{digest}"
    flags = {"batches": "--batch-size", "target": "--tags/--hosts", "release": "--release"}
    errors = [
        FieldError(
            flags.get(e.field.split("[")[0].split(".")[0], "--" + e.field.replace("_", "-")),
            e.message,
        )
        for e in schemas.errors_of("rollout", doc)
    ]
    if errors:
        raise ValidationError("invalid deploy options", errors=errors)
    return doc


@click.command()
@click.option("--release", "release_ref", required=True, help="Release id, or a release TOML file.")
@click.option("--tags", help="Machines carrying ALL these tags (comma-separated).")
@click.option("--hosts", help="Plus these hosts (comma-separated).")
@click.option(
    "--strategy",
    type=click.Choice(["canary", "staged", "all-at-once"]),
    default="canary",
    show_default=True,
    help="canary: one machine first; staged: --batch-size batches; all-at-once: one batch.",
)
@click.option("--batch-size", help="Batch sizes: counts or percentages, e.g. 1,25%,100%.")
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
@click.option("--json", "json_", is_flag=True, help="JSON output.")
@pass_state
def deploy(
    state: State,
    release_ref: str,
    tags: str | None,
    hosts: str | None,
    strategy: str,
    batch_size: str | None,
    failure_threshold: str,
    on_failure: str,
    health_timeout: str,
    soak: str,
    name: str | None,
    wait: bool,
    interval: float,
    json_: bool,
) -> None:
    """Roll a release out to machines in one command (the rollout file built from flags).

    \b
    Example:
      nixfleet deploy --release rel-3f2a9c1d7e4b --tags web,prod --strategy staged \\
        --batch-size 1,25%,100% --failure-threshold 10% --health-timeout 5m --wait
    """
    release_id = release_ref
    if release_ref.endswith(".toml"):
        rel = flake.read_toml(Path(release_ref))
        register_release(state, rel)
        release_id = rel.id
    split = [t.strip() for t in (tags or "").split(",") if t.strip()]
    host_list = [h.strip() for h in (hosts or "").split(",") if h.strip()]
    doc = deploy_document(
        release_id,
        split,
        host_list,
        strategy,
        batch_size,
        failure_threshold,
        on_failure,
        health_timeout,
        soak,
        name,
    )
    submit(state, doc, json_ or state.json, wait, interval)
