-- 0003_enroll_tokens (shipped: append-only, never edited)
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
CREATE INDEX audit_target ON audit (target, id);
