-- 0012_ui_sessions (shipped: append-only, never edited)
-- Dashboard sessions (nixfleet.store.sessions): a row per login, keyed by the hash
-- of its cookie; the key it was opened with must stay unrevoked for it to count.
CREATE TABLE ui_sessions (
    token_hash TEXT PRIMARY KEY,
    key_name TEXT NOT NULL REFERENCES api_keys (name) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX ui_sessions_last_seen ON ui_sessions (last_seen_at);
