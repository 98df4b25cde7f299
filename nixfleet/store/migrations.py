"""Named migrations, applied in order and recorded in schema_migrations.

Append only: a migration that has shipped is never edited, a change is a new entry.
Statements are separated by ';' (a trigger's body keeps its own: store.db splits
with sqlite3.complete_statement; no ';' inside literals). The SQL of 0001-0012 is in
`sql/NNNN_name.sql` (each opens with its reasons as `--` lines); later ones are
written here and may move there, unchanged, once this module grows long.
"""

from __future__ import annotations

from importlib import resources


def _shipped(*names: str) -> list[tuple[str, str]]:
    """Migrations kept as SQL files, `sql/<name>.sql` beside this module; their header
    lines (`-- …`, the migration's reasons) are left out of what runs."""
    folder = resources.files("nixfleet.store") / "sql"
    out = []
    for name in names:
        text = (folder / f"{name}.sql").read_text()
        out.append((name, "\n".join(x for x in text.splitlines() if not x.startswith("--"))))
    return out


MIGRATIONS: list[tuple[str, str]] = [
    *_shipped(
        "0001_machines",
        "0002_credentials_audit",
        "0003_enroll_tokens",
        "0004_releases_rollouts",
        "0005_rollout_poll_hint",
        "0006_bounded_ticks",
        "0007_machine_tags_json",
        "0008_fixed_width_times",
        "0009_checks_and_foreign_keys",
        "0010_machine_events",
        "0011_webhooks_failure_output",
        "0012_ui_sessions",
    ),
    # Rollout policy (DESIGN §11, issue 18): what the agent says about reboots; the
    # reboot leases (one row per machine and group: the FleetLock semaphore); a
    # rollout's reboot policy as a column (the report path answers it without parsing
    # the document) and what holds it back (waiting-for-window, held-by-budget), so
    # a hold is an event once, not every tick.
    (
        "0013_rollout_policy",
        """
        ALTER TABLE machines ADD COLUMN needs_reboot INTEGER;
        ALTER TABLE machines ADD COLUMN booted_generation TEXT;
        ALTER TABLE rollouts ADD COLUMN reboot TEXT;
        ALTER TABLE rollouts ADD COLUMN hold TEXT;
        ALTER TABLE rollouts ADD COLUMN hold_detail TEXT;
        UPDATE rollouts SET reboot = json_extract(document_json, '$.reboot');
        CREATE TABLE reboot_leases (
            grp TEXT NOT NULL,
            machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            rollout_id TEXT,
            acquired_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            PRIMARY KEY (grp, machine_id)
        );
        CREATE INDEX reboot_leases_machine ON reboot_leases (machine_id)
        """,
    ),
]
