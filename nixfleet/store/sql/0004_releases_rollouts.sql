-- 0004_releases_rollouts (shipped: append-only, never edited)
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
);
