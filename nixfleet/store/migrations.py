"""Named migrations, applied in order and recorded in schema_migrations.

Append only: a migration that has shipped is never edited, a change is a new entry.
Statements are separated by ';' (a trigger's body keeps its own: store.db splits
with sqlite3.complete_statement; no ';' inside literals).
"""

# Every time column of 0001-0007, for 0008 (frozen: later columns are written in the
# fixed form from the start).
_TIMES_0008 = {
    "machines": ("registered_at", "desired_set_at", "last_report_at", "retry_requested_at"),
    "reports": ("received_at",),
    "api_keys": ("created_at", "revoked_at"),
    "machine_tokens": ("created_at",),
    "audit": ("at",),
    "enroll_tokens": ("created_at", "expires_at", "revoked_at", "last_used_at"),
    "releases": ("created_at",),
    "rollouts": ("created_at", "updated_at"),
    "rollout_batches": ("started_at", "finished_at"),
    "rollout_machines": ("healthy_since", "decided_at"),
    "rollout_events": ("at",),
    "rollout_files": ("checked_at",),
}

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_machines",
        """
        CREATE TABLE machines (
            id TEXT PRIMARY KEY,
            lifecycle TEXT NOT NULL,
            registered_at TEXT NOT NULL,
            current_generation TEXT,
            desired_generation TEXT,
            desired_cache_url TEXT,
            desired_source TEXT,
            desired_set_at TEXT,
            last_report_at TEXT,
            agent_version TEXT,
            system_state TEXT NOT NULL DEFAULT 'unknown',
            last_success INTEGER,
            last_message TEXT,
            failed_generation TEXT,
            health_json TEXT,
            uptime_seconds INTEGER,
            retry_requested_at TEXT,
            poll_hint INTEGER
        ) WITHOUT ROWID;
        CREATE INDEX machines_lifecycle ON machines (lifecycle);
        CREATE TABLE machine_tags (
            machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            tag TEXT NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('agent', 'operator')),
            PRIMARY KEY (machine_id, tag, source)
        ) WITHOUT ROWID;
        CREATE INDEX machine_tags_tag ON machine_tags (tag, machine_id);
        CREATE TABLE reports (
            id INTEGER PRIMARY KEY,
            machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            received_at TEXT NOT NULL,
            current_generation TEXT NOT NULL,
            success INTEGER NOT NULL,
            message TEXT NOT NULL,
            attempted_generation TEXT,
            health_json TEXT,
            agent_version TEXT,
            uptime_seconds INTEGER
        );
        CREATE INDEX reports_machine ON reports (machine_id, id)
        """,
    ),
    (
        "0002_credentials_audit",
        """
        CREATE TABLE api_keys (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('readonly', 'deploy', 'admin')),
            key_hash TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            revoked_at TEXT
        );
        CREATE TABLE machine_tokens (
            machine_id TEXT PRIMARY KEY REFERENCES machines (id) ON DELETE CASCADE,
            token_hash TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL
        );
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            detail_json TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_at ON audit (at)
        """,
    ),
    (
        "0003_enroll_tokens",
        """
        CREATE TABLE enroll_tokens (
            id TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            uses_left INTEGER NOT NULL CHECK (uses_left >= 0),
            uses_total INTEGER NOT NULL,
            tags_json TEXT NOT NULL DEFAULT '[]',
            hostname_glob TEXT,
            revoked_at TEXT,
            last_used_at TEXT
        );
        CREATE INDEX audit_actor ON audit (actor, id);
        CREATE INDEX audit_target ON audit (target, id)
        """,
    ),
    (
        "0004_releases_rollouts",
        """
        CREATE TABLE releases (
            id TEXT PRIMARY KEY,
            flake_ref TEXT,
            flake_rev TEXT,
            cache_url TEXT,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL
        );
        CREATE TABLE release_entries (
            release_id TEXT NOT NULL REFERENCES releases (id) ON DELETE CASCADE,
            hostname TEXT NOT NULL,
            store_path TEXT NOT NULL,
            platform TEXT NOT NULL,
            tags_json TEXT NOT NULL DEFAULT '[]',
            PRIMARY KEY (release_id, hostname)
        ) WITHOUT ROWID;
        CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            release_id TEXT NOT NULL REFERENCES releases (id),
            status TEXT NOT NULL,
            document_json TEXT NOT NULL,
            document_hash TEXT NOT NULL,
            skipped_json TEXT NOT NULL DEFAULT '[]',
            source TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX rollouts_name ON rollouts (name, created_at);
        CREATE INDEX rollouts_status ON rollouts (status);
        CREATE TABLE rollout_batches (
            rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            size INTEGER NOT NULL,
            status TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            PRIMARY KEY (rollout_id, idx)
        ) WITHOUT ROWID;
        CREATE TABLE rollout_machines (
            rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
            machine_id TEXT NOT NULL,
            batch_idx INTEGER NOT NULL,
            position INTEGER NOT NULL,
            store_path TEXT NOT NULL,
            touched INTEGER NOT NULL DEFAULT 0,
            prev_generation TEXT,
            prev_cache_url TEXT,
            prev_source TEXT,
            health TEXT NOT NULL DEFAULT 'pending',
            reason TEXT,
            healthy_since TEXT,
            decided_at TEXT,
            PRIMARY KEY (rollout_id, machine_id)
        ) WITHOUT ROWID;
        CREATE INDEX rollout_machines_batch ON rollout_machines (rollout_id, batch_idx, position);
        CREATE INDEX rollout_machines_machine ON rollout_machines (machine_id);
        CREATE TABLE rollout_events (
            id INTEGER PRIMARY KEY,
            rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
            at TEXT NOT NULL,
            kind TEXT NOT NULL,
            batch_idx INTEGER,
            machine_id TEXT,
            detail_json TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, id);
        CREATE TABLE rollout_files (
            path TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            name TEXT,
            rollout_id TEXT,
            errors_json TEXT NOT NULL DEFAULT '[]',
            mtime_ns INTEGER,
            checked_at TEXT NOT NULL
        )
        """,
    ),
    # The short poll hint of a running rollout lives on the rollout, and the report
    # path looks it up through rollout_machines_machine: starting, pausing or
    # completing a rollout no longer rewrites a row of machines per target.
    # machines.poll_hint stays (append only) but is no longer read or written.
    (
        "0005_rollout_poll_hint",
        """
        ALTER TABLE rollouts ADD COLUMN poll_hint INTEGER;
        UPDATE rollouts SET poll_hint = (SELECT max(m.poll_hint) FROM rollout_machines rm
            JOIN machines m ON m.id = rm.machine_id WHERE rm.rollout_id = rollouts.id)
        WHERE status = 'running'
        """,
    ),
    # A tick writes at most a bounded number of machines (reconciler.TICK_MACHINES):
    # a large batch gets its desired generations over several ticks (started_until,
    # the last position written) and is judged a window of positions per tick
    # (judged_until, where the next window starts; NULL: from the batch's start),
    # and a revert restores a chunk of positions per tick (rollouts.revert_after,
    # NULL when no revert is under way). Positions of one batch are contiguous
    # (store.rollouts.apply). Batches that started before this migration were
    # written whole.
    (
        "0006_bounded_ticks",
        """
        ALTER TABLE rollouts ADD COLUMN revert_after INTEGER;
        ALTER TABLE rollout_batches ADD COLUMN started_until INTEGER;
        ALTER TABLE rollout_batches ADD COLUMN judged_until INTEGER;
        UPDATE rollout_batches SET started_until = (SELECT max(rm.position)
            FROM rollout_machines rm WHERE rm.rollout_id = rollout_batches.rollout_id
            AND rm.batch_idx = rollout_batches.idx)
        WHERE started_at IS NOT NULL
        """,
    ),
    # Each machine's tags (both sources, sorted, once each) as a JSON array on its row, kept
    # by triggers so no code path can forget it: GET /api/v1/status at 100,000 machines
    # spent a quarter of its time in a per-machine tag sub-select. Tags change rarely
    # (an agent's usual report writes no tag row), so the triggers seldom fire.
    (
        "0007_machine_tags_json",
        """
        ALTER TABLE machines ADD COLUMN tags_json TEXT NOT NULL DEFAULT '[]';
        UPDATE machines SET tags_json = (SELECT json_group_array(tag)
                FROM (SELECT tag FROM machine_tags
                WHERE machine_id = machines.id GROUP BY tag));
        CREATE TRIGGER machine_tags_added AFTER INSERT ON machine_tags BEGIN
            UPDATE machines SET tags_json = (SELECT json_group_array(tag)
                FROM (SELECT tag FROM machine_tags
                WHERE machine_id = NEW.machine_id GROUP BY tag))
            WHERE id = NEW.machine_id;
        END;
        CREATE TRIGGER machine_tags_removed AFTER DELETE ON machine_tags BEGIN
            UPDATE machines SET tags_json = (SELECT json_group_array(tag)
                FROM (SELECT tag FROM machine_tags
                WHERE machine_id = OLD.machine_id GROUP BY tag))
            WHERE id = OLD.machine_id;
        END;
        CREATE TRIGGER machine_tags_changed AFTER UPDATE ON machine_tags BEGIN
            UPDATE machines SET tags_json = (SELECT json_group_array(tag)
                FROM (SELECT tag FROM machine_tags
                WHERE machine_id = OLD.machine_id GROUP BY tag))
            WHERE id = OLD.machine_id;
            UPDATE machines SET tags_json = (SELECT json_group_array(tag)
                FROM (SELECT tag FROM machine_tags
                WHERE machine_id = NEW.machine_id GROUP BY tag))
            WHERE id = NEW.machine_id;
        END
        """,
    ),
    # Times were stored by an isoformat that dropped a zero fraction ("…:00Z", 20
    # characters, which sorts after "…:00.5Z"), so SQL padded them before comparing.
    # Now every time is models.TIME_FORMAT, 27 characters, and compares as stored.
    (
        "0008_fixed_width_times",
        ";\n".join(
            f"UPDATE {table} SET {column} = substr({column}, 1, 19) || '.000000Z' "
            f"WHERE length({column}) = 20"
            for table, columns in _TIMES_0008.items()
            for column in columns
        ),
    ),
    # Every enumerated column gets its CHECK (the values of models' enums), and the two
    # missing foreign keys arrive: rollout_machines.machine_id -> machines and
    # rollout_files.rollout_id -> rollouts. SQLite adds neither to an existing table,
    # so each table is rebuilt (sqlite.org/lang_altertable.html, "making other kinds of
    # table schema changes"); Store.migrate runs migrations with foreign keys off and
    # checks them all before the commit, and legacy_alter_table keeps the renames from
    # rewriting (or tripping over) the machine_tags triggers, which name machines.
    # rowids are kept: listings order by them.
    (
        "0009_checks_and_foreign_keys",
        """
        PRAGMA legacy_alter_table = ON;
        CREATE TABLE machines_new (
            id TEXT PRIMARY KEY,
            lifecycle TEXT NOT NULL CHECK (lifecycle IN
                ('pending', 'provisioning', 'active', 'maintenance', 'decommissioned')),
            registered_at TEXT NOT NULL,
            current_generation TEXT,
            desired_generation TEXT,
            desired_cache_url TEXT,
            desired_source TEXT,
            desired_set_at TEXT,
            last_report_at TEXT,
            agent_version TEXT,
            system_state TEXT NOT NULL DEFAULT 'unknown'
                CHECK (system_state IN ('ok', 'degraded', 'error', 'unknown')),
            last_success INTEGER CHECK (last_success IN (0, 1)),
            last_message TEXT,
            failed_generation TEXT,
            health_json TEXT,
            uptime_seconds INTEGER,
            retry_requested_at TEXT,
            poll_hint INTEGER,
            tags_json TEXT NOT NULL DEFAULT '[]'
        ) WITHOUT ROWID;
        INSERT INTO machines_new SELECT id, lifecycle, registered_at, current_generation,
            desired_generation, desired_cache_url, desired_source, desired_set_at,
            last_report_at, agent_version, system_state, last_success, last_message,
            failed_generation, health_json, uptime_seconds, retry_requested_at, poll_hint,
            tags_json FROM machines;
        DROP TABLE machines;
        ALTER TABLE machines_new RENAME TO machines;
        CREATE INDEX machines_lifecycle ON machines (lifecycle);

        CREATE TABLE rollouts_new (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            release_id TEXT NOT NULL REFERENCES releases (id),
            status TEXT NOT NULL CHECK (status IN
                ('running', 'paused', 'completed', 'failed', 'cancelled')),
            document_json TEXT NOT NULL,
            document_hash TEXT NOT NULL,
            skipped_json TEXT NOT NULL DEFAULT '[]',
            source TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            poll_hint INTEGER,
            revert_after INTEGER
        );
        INSERT INTO rollouts_new (rowid, id, name, release_id, status, document_json,
            document_hash, skipped_json, source, created_at, created_by, updated_at,
            poll_hint, revert_after)
        SELECT rowid, id, name, release_id, status, document_json, document_hash,
            skipped_json, source, created_at, created_by, updated_at, poll_hint,
            revert_after FROM rollouts;
        DROP TABLE rollouts;
        ALTER TABLE rollouts_new RENAME TO rollouts;
        CREATE INDEX rollouts_name ON rollouts (name, created_at);
        CREATE INDEX rollouts_status ON rollouts (status);

        CREATE TABLE rollout_batches_new (
            rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            size INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('pending', 'deploying', 'succeeded', 'failed', 'cancelled')),
            started_at TEXT,
            finished_at TEXT,
            started_until INTEGER,
            judged_until INTEGER,
            PRIMARY KEY (rollout_id, idx)
        ) WITHOUT ROWID;
        INSERT INTO rollout_batches_new SELECT rollout_id, idx, size, status, started_at,
            finished_at, started_until, judged_until FROM rollout_batches;
        DROP TABLE rollout_batches;
        ALTER TABLE rollout_batches_new RENAME TO rollout_batches;

        CREATE TABLE rollout_machines_new (
            rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
            machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            batch_idx INTEGER NOT NULL,
            position INTEGER NOT NULL,
            store_path TEXT NOT NULL,
            touched INTEGER NOT NULL DEFAULT 0,
            prev_generation TEXT,
            prev_cache_url TEXT,
            prev_source TEXT,
            health TEXT NOT NULL DEFAULT 'pending'
                CHECK (health IN ('pending', 'healthy', 'unhealthy')),
            reason TEXT,
            healthy_since TEXT,
            decided_at TEXT,
            PRIMARY KEY (rollout_id, machine_id)
        ) WITHOUT ROWID;
        INSERT INTO rollout_machines_new SELECT rollout_id, machine_id, batch_idx, position,
            store_path, touched, prev_generation, prev_cache_url, prev_source, health, reason,
            healthy_since, decided_at FROM rollout_machines;
        DROP TABLE rollout_machines;
        ALTER TABLE rollout_machines_new RENAME TO rollout_machines;
        CREATE INDEX rollout_machines_batch ON rollout_machines (rollout_id, batch_idx, position);
        CREATE INDEX rollout_machines_machine ON rollout_machines (machine_id);

        CREATE TABLE rollout_files_new (
            path TEXT PRIMARY KEY,
            status TEXT NOT NULL CHECK (status IN ('applied', 'invalid')),
            name TEXT,
            rollout_id TEXT REFERENCES rollouts (id) ON DELETE SET NULL,
            errors_json TEXT NOT NULL DEFAULT '[]',
            mtime_ns INTEGER,
            checked_at TEXT NOT NULL
        );
        INSERT INTO rollout_files_new SELECT path, status, name,
            (SELECT id FROM rollouts WHERE id = rollout_files.rollout_id), errors_json,
            mtime_ns, checked_at FROM rollout_files;
        DROP TABLE rollout_files;
        ALTER TABLE rollout_files_new RENAME TO rollout_files;
        PRAGMA legacy_alter_table = OFF
        """,
    ),
    # History of changes (DESIGN §3 History, nixfleet.store.history): a heartbeat appends
    # nothing, each change is one machine_events row. The report rows are carried over as
    # the changes they show: each machine's kept reports (at most report_retention, by
    # default 100, i.e. the last ~100 minutes) are compared with the report before them;
    # a generation switch, a new failure (rolled back when the agent said so) and a turn of
    # health (passing/failing, naming the checks failing after it) become events at the
    # report's time. The first kept report of each machine has nothing to compare with
    # and yields none; per-check changes while health stays failing are not recovered.
    # Then the reports table goes: nothing reads it any more.
    # Every change of machines.desired_generation, by any statement (the reconciler's
    # set-based ones included), is an event written by the trigger, its source the new
    # desired source (a rollout's label, or "operator").
    (
        "0010_machine_events",
        """
        CREATE TABLE machine_events (
            id INTEGER PRIMARY KEY,
            machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            at TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('generation', 'deployment-failed',
                'rolled-back', 'health', 'tags', 'lifecycle', 'desired')),
            source TEXT NOT NULL,
            generation TEXT,
            detail_json TEXT
        );
        CREATE INDEX machine_events_machine ON machine_events (machine_id, id);
        INSERT INTO machine_events (machine_id, at, kind, source, generation, detail_json)
        SELECT machine_id, received_at, kind, 'agent', generation, detail FROM (
            SELECT id, machine_id, received_at, 0 AS o, 'generation' AS kind,
                current_generation AS generation, NULL AS detail
            FROM (SELECT *, lag(current_generation) OVER w AS prev_gen,
                row_number() OVER w AS n FROM reports
                WINDOW w AS (PARTITION BY machine_id ORDER BY id))
            WHERE n > 1 AND prev_gen IS NOT current_generation
            UNION ALL
            SELECT id, machine_id, received_at, 1,
                CASE WHEN message LIKE 'rolled back%'
                    AND current_generation IS NOT attempted_generation
                    THEN 'rolled-back' ELSE 'deployment-failed' END,
                attempted_generation, json_object('reason', message)
            FROM (SELECT *, lag(success) OVER w AS prev_success,
                lag(attempted_generation) OVER w AS prev_attempted,
                row_number() OVER w AS n FROM reports
                WINDOW w AS (PARTITION BY machine_id ORDER BY id))
            WHERE n > 1 AND success = 0
                AND (prev_success = 1 OR prev_attempted IS NOT attempted_generation)
            UNION ALL
            SELECT id, machine_id, received_at, 2, 'health', NULL, json_object(
                'status', CASE ok WHEN 1 THEN 'healthy' WHEN 0 THEN 'failing'
                    ELSE 'unknown' END,
                'previous', CASE prev_ok WHEN 1 THEN 'healthy' WHEN 0 THEN 'failing'
                    ELSE 'unknown' END,
                'failing', json((SELECT coalesce(json_group_array(
                    json_extract(c.value, '$.name')), '[]')
                    FROM json_each(health_json, '$.results') c
                    WHERE json_extract(c.value, '$.passed') = 0)),
                'newly_failing', json('[]'), 'recovered', json('[]'))
            FROM (SELECT *, json_extract(health_json, '$.all_passed') AS ok,
                lag(json_extract(health_json, '$.all_passed')) OVER w AS prev_ok,
                row_number() OVER w AS n FROM reports
                WINDOW w AS (PARTITION BY machine_id ORDER BY id))
            WHERE n > 1 AND ok IS NOT prev_ok
        ) ORDER BY received_at, id, o;
        DROP TABLE reports;
        CREATE TRIGGER machine_desired_changed AFTER UPDATE OF desired_generation ON machines
        WHEN OLD.desired_generation IS NOT NEW.desired_generation BEGIN
            INSERT INTO machine_events (machine_id, at, kind, source, generation)
            VALUES (NEW.id, coalesce(NEW.desired_set_at, strftime('%Y-%m-%dT%H:%M:%f') || '000Z'),
                'desired', coalesce(NEW.desired_source, 'operator'), NEW.desired_generation);
        END
        """,
    ),
    # machines.failed_output: the tail of a failed switch's output, kept with the failure.
    # rollouts.confirm_timeout: seconds, from the document, for the report answer (no
    # earlier document has one: the schema refused it).
    # Webhooks (docs/webhooks.md): an outbox row per event, written by triggers in the
    # very transaction of the change (a rollout event, a newly failed generation), so
    # no code path can forget one and none is sent for a change that rolled back. The
    # sender fans each row out to a delivery per subscribed URL and keeps every attempt.
    (
        "0011_webhooks_failure_output",
        """
        ALTER TABLE machines ADD COLUMN failed_output TEXT;
        ALTER TABLE rollouts ADD COLUMN confirm_timeout INTEGER;
        CREATE TABLE webhook_outbox (
            id INTEGER PRIMARY KEY,
            event TEXT NOT NULL,
            at TEXT NOT NULL,
            rollout_id TEXT,
            machine_id TEXT,
            detail_json TEXT NOT NULL DEFAULT '{}',
            fanned_out INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX webhook_outbox_new ON webhook_outbox (id) WHERE fanned_out = 0;
        CREATE TABLE webhook_deliveries (
            id INTEGER PRIMARY KEY,
            outbox_id INTEGER NOT NULL REFERENCES webhook_outbox (id) ON DELETE CASCADE,
            url TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            next_attempt_at TEXT NOT NULL,
            last_attempt_at TEXT,
            last_status INTEGER,
            last_error TEXT,
            finished_at TEXT
        );
        CREATE INDEX webhook_deliveries_due ON webhook_deliveries (url, next_attempt_at)
            WHERE state = 'pending';
        CREATE INDEX webhook_deliveries_outbox ON webhook_deliveries (outbox_id);
        CREATE TABLE webhook_attempts (
            id INTEGER PRIMARY KEY,
            delivery_id INTEGER NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
            at TEXT NOT NULL,
            status INTEGER,
            error TEXT,
            duration_ms INTEGER NOT NULL
        );
        CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
        CREATE TABLE webhook_stale (
            machine_id TEXT PRIMARY KEY,
            last_report_at TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE TRIGGER webhook_rollout_event AFTER INSERT ON rollout_events
        WHEN NEW.kind IN ('rollout-created', 'rollout-paused', 'rollout-resumed',
            'rollout-failed', 'rollout-completed', 'rollout-cancelled', 'batch-started',
            'machine-unhealthy') BEGIN
            INSERT INTO webhook_outbox (event, at, rollout_id, machine_id, detail_json)
            VALUES (CASE NEW.kind WHEN 'rollout-created' THEN 'rollout.started'
                    WHEN 'batch-started' THEN 'batch.started'
                    WHEN 'machine-unhealthy' THEN 'machine.unhealthy'
                    ELSE 'rollout.' || substr(NEW.kind, 9) END,
                NEW.at, NEW.rollout_id, NEW.machine_id,
                CASE WHEN NEW.batch_idx IS NULL THEN NEW.detail_json
                    ELSE json_set(NEW.detail_json, '$.batch', NEW.batch_idx) END);
        END;
        CREATE TRIGGER webhook_machine_failed AFTER UPDATE OF failed_generation ON machines
        WHEN NEW.failed_generation IS NOT NULL
            AND NEW.failed_generation IS NOT OLD.failed_generation BEGIN
            INSERT INTO webhook_outbox (event, at, rollout_id, machine_id, detail_json)
            VALUES ('machine.failed', coalesce(NEW.last_report_at,
                    strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')),
                (SELECT rm.rollout_id FROM rollout_machines rm
                    JOIN rollouts r ON r.id = rm.rollout_id
                    WHERE rm.machine_id = NEW.id AND r.status IN ('running', 'paused')
                    ORDER BY r.created_at DESC LIMIT 1),
                NEW.id,
                json_object('generation', NEW.failed_generation,
                    'current_generation', NEW.current_generation,
                    'message', NEW.last_message));
        END
        """,
    ),
    # Dashboard sessions (nixfleet.store.sessions): a row per login, keyed by the hash
    # of its cookie; the key it was opened with must stay unrevoked for it to count.
    (
        "0012_ui_sessions",
        """
        CREATE TABLE ui_sessions (
            token_hash TEXT PRIMARY KEY,
            key_name TEXT NOT NULL REFERENCES api_keys (name) ON DELETE CASCADE,
            created_at TEXT NOT NULL,
            last_seen_at TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX ui_sessions_last_seen ON ui_sessions (last_seen_at)
        """,
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
    # History in a compact layout (issue 16; nixfleet.store.history says what each
    # column holds, docs/performance.md "Storage" why): events clustered per machine
    # under (machine number, seq) in a WITHOUT ROWID table, times as integers, kind and
    # source as small codes, store paths without their constant parts. The events of
    # 0010's layout are carried over in order (each keeping its path text: references
    # to an earlier event's path are written by new events only). The desired trigger
    # is the same rule in the new layout. machine_history shows the rows readably.
    (
        "0015_compact_machine_events",
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
            (6, 'lifecycle');
        CREATE TABLE event_sources (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
        INSERT INTO event_sources (id, name) VALUES (1, 'agent'), (2, 'operator');
        INSERT OR IGNORE INTO event_sources (name)
            SELECT source FROM machine_events GROUP BY source ORDER BY min(id);
        CREATE TABLE events_0014 (
            machine INTEGER NOT NULL REFERENCES machine_numbers (num) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            at INTEGER NOT NULL,
            kind INTEGER NOT NULL REFERENCES event_kinds (code),
            source INTEGER NOT NULL REFERENCES event_sources (id),
            generation,
            detail TEXT,
            PRIMARY KEY (machine, seq)
        ) WITHOUT ROWID;
        INSERT INTO events_0014 (machine, seq, at, kind, source, generation, detail)
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
        DROP TRIGGER machine_desired_changed;
        DROP TABLE machine_events;
        ALTER TABLE events_0014 RENAME TO machine_events;
        CREATE TRIGGER machine_desired_changed AFTER UPDATE OF desired_generation ON machines
        WHEN OLD.desired_generation IS NOT NEW.desired_generation BEGIN
            INSERT OR IGNORE INTO event_sources (name)
                VALUES (coalesce(NEW.desired_source, 'operator'));
            INSERT INTO machine_events (machine, seq, at, kind, source, generation)
            SELECT n.num, coalesce((SELECT max(e.seq) FROM machine_events e
                    WHERE e.machine = n.num), 0) + 1,
                unixepoch(substr(t.at, 1, 19)) * 1000000
                    + CAST(substr(t.at, 21, 6) AS INTEGER),
                0,
                (SELECT s.id FROM event_sources s
                    WHERE s.name = coalesce(NEW.desired_source, 'operator')),
                CASE WHEN substr(NEW.desired_generation, 1, 11) = '/nix/store/'
                    AND substr(NEW.desired_generation, 12, 1) <> '/'
                    AND length(NEW.desired_generation) > 11
                    AND instr(NEW.desired_generation, char(1)) = 0
                    THEN replace(substr(NEW.desired_generation, 12), '-nixos-system-', char(1))
                    ELSE NEW.desired_generation END
            FROM machine_numbers n, (SELECT coalesce(NEW.desired_set_at,
                strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')) AS at) t
            WHERE n.machine_id = NEW.id;
        END;
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
]
