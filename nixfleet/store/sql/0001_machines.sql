-- 0001_machines (shipped: append-only, never edited)
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
CREATE INDEX reports_machine ON reports (machine_id, id);
