-- 0009_checks_and_foreign_keys (shipped: append-only, never edited)
-- Every enumerated column gets its CHECK (the values of models' enums), and the two
-- missing foreign keys arrive: rollout_machines.machine_id -> machines and
-- rollout_files.rollout_id -> rollouts. SQLite adds neither to an existing table,
-- so each table is rebuilt (sqlite.org/lang_altertable.html, "making other kinds of
-- table schema changes"); Store.migrate runs migrations with foreign keys off and
-- checks them all before the commit, and legacy_alter_table keeps the renames from
-- rewriting (or tripping over) the machine_tags triggers, which name machines.
-- rowids are kept: listings order by them.
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
PRAGMA legacy_alter_table = OFF;
