"""Dashboard sessions on both backends (SQLite, PostgreSQL): hashed, idle expiry, tied to their key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nixfleet.store import credentials, sessions
from nixfleet.store.conn import AnyStore

T0 = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)
IDLE = 600


def test_a_session_lives_while_used_and_dies_idle(any_store: AnyStore) -> None:
    with any_store.transaction() as conn:
        credentials.create_key(conn, "ops", "deploy", "test", T0)
        token = sessions.create(conn, "ops", T0)
    assert token.startswith(sessions.SESSION_PREFIX)
    with any_store.read() as conn:
        found = sessions.find(conn, token, T0 + timedelta(seconds=IDLE), IDLE)
        assert found is not None
        assert (found.key_name, found.role) == ("ops", "deploy")
        assert sessions.find(conn, token, T0 + timedelta(seconds=IDLE + 1), IDLE) is None
        assert sessions.find(conn, token + "x", T0, IDLE) is None
        # Only the hash is stored.
        assert (
            conn.execute(
                "SELECT count(*) FROM ui_sessions WHERE token_hash = ?", (token,)
            ).fetchone()[0]
            == 0
        )
    with any_store.transaction() as conn:
        sessions.touch(conn, token, T0 + timedelta(seconds=IDLE))
    with any_store.read() as conn:
        assert sessions.find(conn, token, T0 + timedelta(seconds=2 * IDLE), IDLE) is not None


def test_revoking_the_key_ends_the_session_and_prune_forgets_idle_ones(any_store: AnyStore) -> None:
    with any_store.transaction() as conn:
        credentials.create_key(conn, "a", "admin", "test", T0)
        credentials.create_key(conn, "b", "readonly", "test", T0)
        ta = sessions.create(conn, "a", T0)
        tb = sessions.create(conn, "b", T0 + timedelta(seconds=IDLE))
        credentials.revoke_key(conn, "a", T0)
    with any_store.read() as conn:
        assert sessions.find(conn, ta, T0, IDLE) is None
        assert sessions.find(conn, tb, T0 + timedelta(seconds=IDLE), IDLE) is not None
    with any_store.transaction() as conn:
        assert sessions.prune(conn, T0 + timedelta(seconds=IDLE + 1), IDLE) == 1
        sessions.delete(conn, tb)
    with any_store.read() as conn:
        assert conn.execute("SELECT count(*) FROM ui_sessions").fetchone()[0] == 0
