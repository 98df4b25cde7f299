"""Named migrations, applied in order and recorded in schema_migrations.

Append only: a migration that has shipped is never edited, a change is a new entry.
Statements are separated by ';' (no ';' inside literals).
"""

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
]
