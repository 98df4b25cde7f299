-- 0003_sessions_enroll_tokens: dashboard sessions and enrollment tokens, as SQLite
-- has them (0003, 0012; fixed-width text times, 0008). ui_sessions is an ordinary
-- table keyed by the cookie's hash (SQLite's WITHOUT ROWID has no twin here).
CREATE TABLE ui_sessions (
    token_hash TEXT COLLATE "C" PRIMARY KEY,
    key_name TEXT COLLATE "C" NOT NULL REFERENCES api_keys (name) ON DELETE CASCADE,
    created_at TEXT COLLATE "C" NOT NULL,
    last_seen_at TEXT COLLATE "C" NOT NULL
);
CREATE INDEX ui_sessions_last_seen ON ui_sessions (last_seen_at);
CREATE TABLE enroll_tokens (
    id TEXT COLLATE "C" PRIMARY KEY,
    token_hash TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at TEXT COLLATE "C" NOT NULL,
    created_by TEXT COLLATE "C" NOT NULL,
    expires_at TEXT COLLATE "C" NOT NULL,
    uses_left INTEGER NOT NULL CHECK (uses_left >= 0),
    uses_total INTEGER NOT NULL,
    tags_json TEXT COLLATE "C" NOT NULL DEFAULT '[]',
    hostname_glob TEXT COLLATE "C",
    revoked_at TEXT COLLATE "C",
    last_used_at TEXT COLLATE "C"
);
