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
    # The report path's in-memory view (nixfleet.api.report_cache, docs/control-plane.md
    # "Heartbeats"): every change to what a report is answered from, or judged a
    # heartbeat against, appends a row here in the transaction that makes it, so each
    # server process reloads exactly what changed. kind 'machine': one machine (its
    # state, lifecycle, tags, token, retry); 'rollout': a rollout's answer fields
    # (status, poll hint, confirm window, reboot policy); 'members': the machines of
    # a rollout at positions (lo, hi] (a new rollout: all of them; a tick writing
    # desired generations: its chunk, recorded by store.ticks itself, as a per-row
    # trigger on the bulk desired writes costs the tick 3-9 us a machine).
    # The desired generation an operator sets is recorded by store.machines.set_desired.
    (
        "0014_report_cache",
        """
        CREATE TABLE cache_changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL CHECK (kind IN ('machine', 'rollout', 'members')),
            machine_id TEXT,
            rollout_id TEXT,
            lo INTEGER,
            hi INTEGER
        );
        CREATE TRIGGER cache_machine_changed AFTER UPDATE OF lifecycle, current_generation,
            failed_generation, last_success, last_message, system_state, health_json,
            agent_version, needs_reboot, booted_generation, retry_requested_at, tags_json
            ON machines
        WHEN OLD.lifecycle IS NOT NEW.lifecycle
            OR OLD.current_generation IS NOT NEW.current_generation
            OR OLD.failed_generation IS NOT NEW.failed_generation
            OR OLD.last_success IS NOT NEW.last_success
            OR OLD.last_message IS NOT NEW.last_message
            OR OLD.system_state IS NOT NEW.system_state
            OR OLD.health_json IS NOT NEW.health_json
            OR OLD.agent_version IS NOT NEW.agent_version
            OR OLD.needs_reboot IS NOT NEW.needs_reboot
            OR OLD.booted_generation IS NOT NEW.booted_generation
            OR OLD.retry_requested_at IS NOT NEW.retry_requested_at
            OR OLD.tags_json IS NOT NEW.tags_json BEGIN
            INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', NEW.id);
        END;
        CREATE TRIGGER cache_token_added AFTER INSERT ON machine_tokens BEGIN
            INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', NEW.machine_id);
        END;
        CREATE TRIGGER cache_token_changed AFTER UPDATE ON machine_tokens BEGIN
            INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', OLD.machine_id);
            INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', NEW.machine_id);
        END;
        CREATE TRIGGER cache_token_removed AFTER DELETE ON machine_tokens BEGIN
            INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', OLD.machine_id);
        END;
        CREATE TRIGGER cache_rollout_added AFTER INSERT ON rollouts BEGIN
            INSERT INTO cache_changes (kind, rollout_id) VALUES ('rollout', NEW.id);
            INSERT INTO cache_changes (kind, rollout_id) VALUES ('members', NEW.id);
        END;
        CREATE TRIGGER cache_rollout_changed AFTER UPDATE OF status, poll_hint, confirm_timeout,
            reboot ON rollouts
        WHEN OLD.status IS NOT NEW.status OR OLD.poll_hint IS NOT NEW.poll_hint
            OR OLD.confirm_timeout IS NOT NEW.confirm_timeout
            OR OLD.reboot IS NOT NEW.reboot BEGIN
            INSERT INTO cache_changes (kind, rollout_id) VALUES ('rollout', NEW.id);
        END
        """,
    ),
    # Per-row triggers on the tick's bulk writes go (docs/performance.md, "The tick
    # regression"): even one whose WHEN is false costs ~5 µs a row, a tick ~100 ms per
    # 20,000. Desired-generation events are written by the writers of
    # desired_generation themselves, set-based (store.history.add_desired); rollout
    # events' webhooks by the writers of rollout events (store.rollouts.add_events,
    # and store.verdicts.judge_batch set-based for machine.unhealthy).
    (
        "0015_no_per_row_triggers_on_ticks",
        """
        DROP TRIGGER machine_desired_changed;
        DROP TRIGGER webhook_rollout_event
        """,
    ),
    # Reboots in a machine's history (DESIGN §3 History, §11): kinds 'reboot-needed' and
    # 'rebooted' (machine_events rebuilt for its CHECK, rows kept with their ids); and
    # the machine.reboot-needed webhook, by a trigger in the report's transaction when
    # the agent first says the running generation needs a reboot.
    (
        "0016_reboot_history",
        """
        CREATE TABLE machine_events_new (
            id INTEGER PRIMARY KEY,
            machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            at TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('generation', 'deployment-failed',
                'rolled-back', 'health', 'tags', 'lifecycle', 'desired', 'reboot-needed',
                'rebooted')),
            source TEXT NOT NULL,
            generation TEXT,
            detail_json TEXT
        );
        INSERT INTO machine_events_new (id, machine_id, at, kind, source, generation, detail_json)
            SELECT id, machine_id, at, kind, source, generation, detail_json
            FROM machine_events ORDER BY id;
        DROP TABLE machine_events;
        ALTER TABLE machine_events_new RENAME TO machine_events;
        CREATE INDEX machine_events_machine ON machine_events (machine_id, id);
        CREATE TRIGGER webhook_machine_reboot_needed AFTER UPDATE OF needs_reboot ON machines
        WHEN NEW.needs_reboot = 1 AND OLD.needs_reboot IS NOT 1 BEGIN
            INSERT INTO webhook_outbox (event, at, rollout_id, machine_id, detail_json)
            VALUES ('machine.reboot-needed', coalesce(NEW.last_report_at,
                    strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')),
                (SELECT rm.rollout_id FROM rollout_machines rm
                    JOIN rollouts r ON r.id = rm.rollout_id
                    WHERE rm.machine_id = NEW.id AND r.status IN ('running', 'paused')
                    ORDER BY r.created_at DESC LIMIT 1),
                NEW.id,
                json_object('generation', NEW.current_generation,
                    'booted_generation', NEW.booted_generation));
        END
        """,
    ),
    # History in a compact layout (issue 16; nixfleet.store.history says what each
    # column holds, docs/performance.md "Storage" why): events clustered per machine
    # under (machine number, seq) in a WITHOUT ROWID table, times as integers, kind and
    # source as small codes, store paths without their constant parts. The events of
    # 0010/0016 layout are carried over in order (each keeping its path text: references
    # to an earlier event's path are written by new events only). machine_history
    # shows the rows readably.
    (
        "0017_compact_machine_events",
        """
        CREATE TABLE machine_numbers (
            num INTEGER PRIMARY KEY,
            machine_id TEXT NOT NULL UNIQUE REFERENCES machines (id) ON DELETE CASCADE
        );
        INSERT INTO machine_numbers (machine_id) SELECT id FROM machines ORDER BY id;
        CREATE TRIGGER machine_numbered AFTER INSERT ON machines BEGIN
            INSERT INTO machine_numbers (machine_id) VALUES (NEW.id);
        END;
        CREATE TABLE event_kinds (code INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
        INSERT INTO event_kinds (code, name) VALUES (0, 'desired'), (1, 'generation'),
            (2, 'health'), (3, 'deployment-failed'), (4, 'rolled-back'), (5, 'tags'),
            (6, 'lifecycle'), (7, 'reboot-needed'), (8, 'rebooted');
        CREATE TABLE event_sources (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
        INSERT INTO event_sources (id, name) VALUES (1, 'agent'), (2, 'operator');
        INSERT OR IGNORE INTO event_sources (name)
            SELECT source FROM machine_events GROUP BY source ORDER BY min(id);
        CREATE TABLE events_0017 (
            machine INTEGER NOT NULL REFERENCES machine_numbers (num) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            at INTEGER NOT NULL,
            kind INTEGER NOT NULL REFERENCES event_kinds (code),
            source INTEGER NOT NULL REFERENCES event_sources (id),
            generation,
            detail TEXT,
            PRIMARY KEY (machine, seq)
        ) WITHOUT ROWID;
        INSERT INTO events_0017 (machine, seq, at, kind, source, generation, detail)
        SELECT n.num, row_number() OVER (PARTITION BY e.machine_id ORDER BY e.id),
            unixepoch(substr(e.at, 1, 19)) * 1000000 + CAST(substr(e.at, 21, 6) AS INTEGER),
            k.code, s.id,
            CASE WHEN substr(e.generation, 1, 11) = '/nix/store/'
                AND substr(e.generation, 12, 1) <> '/' AND length(e.generation) > 11
                AND instr(e.generation, char(1)) = 0
                THEN replace(substr(e.generation, 12), '-nixos-system-', char(1))
                ELSE e.generation END,
            e.detail_json
        FROM machine_events e
        JOIN machine_numbers n ON n.machine_id = e.machine_id
        JOIN event_kinds k ON k.name = e.kind
        JOIN event_sources s ON s.name = e.source
        ORDER BY n.num, e.id;
        DROP TABLE machine_events;
        ALTER TABLE events_0017 RENAME TO machine_events;
        CREATE VIEW machine_history AS
        SELECT n.machine_id, e.seq,
            strftime('%Y-%m-%dT%H:%M:%S', e.at / 1000000, 'unixepoch')
                || printf('.%06dZ', e.at % 1000000) AS at,
            k.name AS kind, s.name AS source,
            CASE WHEN e.path IS NULL OR substr(e.path, 1, 1) = '/' THEN e.path
                ELSE '/nix/store/' || replace(e.path, char(1), '-nixos-system-')
                END AS generation,
            e.detail
        FROM (SELECT h.machine, h.seq, h.at, h.kind, h.source, h.detail,
                CASE WHEN typeof(h.generation) = 'integer' THEN
                    (SELECT x.generation FROM machine_events x WHERE x.machine = h.machine
                        AND x.seq = h.seq - h.generation)
                ELSE h.generation END AS path
            FROM machine_events h) e
        JOIN machine_numbers n ON n.num = e.machine
        JOIN event_kinds k ON k.code = e.kind
        JOIN event_sources s ON s.id = e.source
        """,
    ),
    # Retention of deployments (issue 16, storage): a finished rollout older than
    # rollout_retention_days keeps its row, batches and events but loses its per-machine
    # rows; each batch keeps its health counts. An unused old release keeps its header
    # (rollouts and the audit log name it) but loses its entries. store.retention.
    (
        "0018_deployment_retention",
        """
        ALTER TABLE rollouts ADD COLUMN machines_pruned_at TEXT;
        ALTER TABLE rollout_batches ADD COLUMN healthy INTEGER;
        ALTER TABLE rollout_batches ADD COLUMN unhealthy INTEGER;
        ALTER TABLE rollout_batches ADD COLUMN pending INTEGER;
        ALTER TABLE releases ADD COLUMN pruned_at TEXT;
        """,
    ),
    # Indexes for the reconciler tick at 100,000 machines (docs/performance.md, "Session
    # 5"): the policy tick's unavailable set (store.policy.UNAVAILABLE_SQL) looks up the
    # stale and the troubled machines instead of scanning every machine (65 -> 6 ms; a
    # report rewrites one entry of the first index), and the batch tally and the
    # started-but-unsettled machines are counted from a covering index of the rows
    # not yet healthy (tally 52 -> 10 ms with half the batch pending).
    (
        "0019_tick_indexes",
        """
        CREATE INDEX machines_last_report ON machines (last_report_at);
        CREATE INDEX machines_troubled ON machines (system_state)
            WHERE system_state IN ('error', 'degraded');
        CREATE INDEX rollout_machines_unsettled
            ON rollout_machines (rollout_id, batch_idx, health, position)
            WHERE health != 'healthy';
        """,
    ),
    # The health axis stored with the report that set it (models.health_of, written by
    # store.machines.record_report), so that the status document, the dashboard's
    # counters and the batch judge read a short column instead of parsing every
    # machine's health results (docs/performance.md, "Session 6"). The backfill is the
    # SQL form of health_of that HEALTH_SQL was until now.
    (
        "0020_stored_health",
        """
        ALTER TABLE machines ADD COLUMN health TEXT NOT NULL DEFAULT 'unknown'
            CHECK (health IN ('healthy', 'failing', 'unknown'));
        UPDATE machines SET health = CASE
            WHEN json_extract(health_json, '$.all_passed') THEN 'healthy' ELSE 'failing' END
            WHERE health_json IS NOT NULL;
        """,
    ),
    # Health results in their stored form (store.rows.health_to_stored): the values
    # without the keys, a third of the bytes (docs/performance.md, "Session 8").
    (
        "0021_compact_health",
        """
        UPDATE machines SET health_json = json_array(
            CASE WHEN json_extract(health_json, '$.all_passed') THEN 1 ELSE 0 END,
            json((SELECT json_group_array(json_array(
                    json_extract(r.value, '$.name'), json_extract(r.value, '$.kind'),
                    CASE WHEN json_extract(r.value, '$.passed') THEN 1 ELSE 0 END,
                    coalesce(json_extract(r.value, '$.duration_ms'), 0),
                    coalesce(json_extract(r.value, '$.message'), '')))
                FROM (SELECT value FROM json_each(health_json, '$.results') ORDER BY key) r)))
            WHERE json_type(health_json) = 'object';
        """,
    ),
    # Tags keyed by the machine's number (machine_numbers) and a source code instead of
    # the id and source texts, in the table and in its tag index: ~45 % of the bytes
    # (docs/performance.md, "Session 8"). `machine_tags` stays as a view with the
    # same columns, so every query reads as before; store.machines writes the rows
    # (TAG_SOURCES: 1 agent, 2 operator), and the triggers keep tags_json as before.
    (
        "0022_numbered_tags",
        """
        CREATE TABLE machine_tag_rows (
            machine INTEGER NOT NULL REFERENCES machine_numbers (num) ON DELETE CASCADE,
            tag TEXT NOT NULL,
            source INTEGER NOT NULL CHECK (source IN (1, 2)),
            PRIMARY KEY (machine, tag, source)
        ) WITHOUT ROWID;
        INSERT INTO machine_tag_rows (machine, tag, source)
            SELECT n.num, t.tag, CASE t.source WHEN 'agent' THEN 1 ELSE 2 END
            FROM machine_tags t JOIN machine_numbers n ON n.machine_id = t.machine_id;
        DROP TABLE machine_tags;
        CREATE INDEX machine_tag_rows_tag ON machine_tag_rows (tag, machine);
        CREATE VIEW machine_tags (machine_id, tag, source) AS
            SELECT n.machine_id, t.tag, CASE t.source WHEN 1 THEN 'agent' ELSE 'operator' END
            FROM machine_tag_rows t JOIN machine_numbers n ON n.num = t.machine;
        CREATE TRIGGER machine_tag_rows_added AFTER INSERT ON machine_tag_rows BEGIN
            UPDATE machines SET tags_json = (SELECT json_group_array(tag)
                FROM (SELECT tag FROM machine_tag_rows
                WHERE machine = NEW.machine GROUP BY tag))
            WHERE id = (SELECT machine_id FROM machine_numbers WHERE num = NEW.machine);
        END;
        CREATE TRIGGER machine_tag_rows_removed AFTER DELETE ON machine_tag_rows BEGIN
            UPDATE machines SET tags_json = (SELECT json_group_array(tag)
                FROM (SELECT tag FROM machine_tag_rows
                WHERE machine = OLD.machine GROUP BY tag))
            WHERE id = (SELECT machine_id FROM machine_numbers WHERE num = OLD.machine);
        END;
        CREATE TRIGGER machine_tag_rows_changed AFTER UPDATE ON machine_tag_rows BEGIN
            UPDATE machines SET tags_json = (SELECT json_group_array(tag)
                FROM (SELECT tag FROM machine_tag_rows
                WHERE machine = m.num GROUP BY tag))
            FROM (SELECT num, machine_id FROM machine_numbers
                WHERE num IN (OLD.machine, NEW.machine)) m
            WHERE machines.id = m.machine_id;
        END;
        """,
    ),
    # A machine token's hash as its 32 bytes (credentials.token_digest), not 64 hex
    # digits, in a table clustered by machine id: ~40 % of the bytes of the table and its
    # two indexes (docs/performance.md, "Session 8"). nixfleet_unhex is the Python
    # function Store.migrate lends the migrations (SQLite has unhex only from 3.41).
    (
        "0023_raw_token_hashes",
        """
        CREATE TABLE machine_tokens_raw (
            machine_id TEXT PRIMARY KEY REFERENCES machines (id) ON DELETE CASCADE,
            token_hash BLOB NOT NULL UNIQUE
                CHECK (typeof(token_hash) = 'blob' AND length(token_hash) = 32),
            created_at TEXT NOT NULL
        ) WITHOUT ROWID;
        INSERT INTO machine_tokens_raw (machine_id, token_hash, created_at)
            SELECT machine_id, nixfleet_unhex(token_hash), created_at FROM machine_tokens;
        DROP TABLE machine_tokens;
        ALTER TABLE machine_tokens_raw RENAME TO machine_tokens;
        CREATE TRIGGER cache_token_added AFTER INSERT ON machine_tokens BEGIN
            INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', NEW.machine_id);
        END;
        CREATE TRIGGER cache_token_changed AFTER UPDATE ON machine_tokens BEGIN
            INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', OLD.machine_id);
            INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', NEW.machine_id);
        END;
        CREATE TRIGGER cache_token_removed AFTER DELETE ON machine_tokens BEGIN
            INSERT INTO cache_changes (kind, machine_id) VALUES ('machine', OLD.machine_id);
        END;
        """,
    ),
    # A machine's system paths without its own name (issue 16, storage): every path of a
    # NixOS system is ".../<hash>-nixos-system-<name>-<label>", and <name> is the
    # machine's (its id's first DNS label), so "-nixos-system-<name>-" is stored as one
    # byte, char(2) (event_forms.encode_path; ~8 bytes of ~49 per stored path in the
    # benchmark's fleet, more with longer host names). Stored texts are decoded in the
    # 0017 form and encoded again; a path that held char(2) itself is kept whole.
    (
        "0024_paths_without_host_names",
        """
        UPDATE machine_events AS e SET generation = CASE
            WHEN instr(e.generation, char(2)) > 0
                THEN '/nix/store/' || replace(e.generation, char(1), '-nixos-system-')
            ELSE replace(replace(replace(e.generation, char(1), '-nixos-system-'),
                '-nixos-system-' || substr(n.machine_id, 1,
                    instr(n.machine_id || '.', '.') - 1) || '-', char(2)),
                '-nixos-system-', char(1)) END
        FROM machine_numbers n
        WHERE n.num = e.machine AND typeof(e.generation) = 'text'
            AND substr(e.generation, 1, 1) <> '/'
            AND (instr(e.generation, char(2)) > 0 OR instr(e.generation, char(1)
                || substr(n.machine_id, 1, instr(n.machine_id || '.', '.') - 1) || '-') > 0);
        DROP VIEW machine_history;
        CREATE VIEW machine_history AS
        SELECT n.machine_id, e.seq,
            strftime('%Y-%m-%dT%H:%M:%S', e.at / 1000000, 'unixepoch')
                || printf('.%06dZ', e.at % 1000000) AS at,
            k.name AS kind, s.name AS source,
            CASE WHEN e.path IS NULL OR substr(e.path, 1, 1) = '/' THEN e.path
                ELSE '/nix/store/' || replace(replace(e.path, char(1), '-nixos-system-'),
                    char(2), '-nixos-system-' || substr(n.machine_id, 1,
                        instr(n.machine_id || '.', '.') - 1) || '-')
                END AS generation,
            e.detail
        FROM (SELECT h.machine, h.seq, h.at, h.kind, h.source, h.detail,
                CASE WHEN typeof(h.generation) = 'integer' THEN
                    (SELECT x.generation FROM machine_events x WHERE x.machine = h.machine
                        AND x.seq = h.seq - h.generation)
                ELSE h.generation END AS path
            FROM machine_events h) e
        JOIN machine_numbers n ON n.num = e.machine
        JOIN event_kinds k ON k.code = e.kind
        JOIN event_sources s ON s.id = e.source;
        """,
    ),
]
