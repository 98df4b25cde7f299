-- 0003_sessions_enroll_tokens: dashboard sessions and enrollment tokens, as SQLite
-- has them (0003, 0012; fixed-width text times, 0008). ui_sessions is an ordinary
-- table keyed by the cookie's hash (SQLite's WITHOUT ROWID has no twin here).
CREATE TABLE ui_sessions (
    token_hash TEXT PRIMARY KEY,
    key_name TEXT NOT NULL REFERENCES api_keys (name) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL
);
CREATE INDEX ui_sessions_last_seen ON ui_sessions (last_seen_at);
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
