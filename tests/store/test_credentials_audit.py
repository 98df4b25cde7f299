"""API keys, machine tokens and the audit log, the same functions on SQLite and on
PostgreSQL.

The first noun modules ported to both backends (docs/scaling.md "PostgreSQL
backend: design"); every test here runs once per backend (`any_store`).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from nixfleet.errors import ConflictError, NotFoundError, ValidationError
from nixfleet.models import Lifecycle, isoformat
from nixfleet.store import audit, credentials, machines
from nixfleet.store.conn import AnyStore

T0 = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def test_keys_are_created_found_by_their_secret_and_revoked(any_store: AnyStore) -> None:
    with any_store.transaction() as conn:
        key = credentials.create_key(conn, "ops", "deploy", "test", T0)
        credentials.create_key(conn, "admin", "admin", "test", T0)
    assert key.startswith(credentials.KEY_PREFIX)
    with any_store.read() as conn:
        assert credentials.key_role(conn, key) == ("ops", "deploy")
        assert credentials.key_role(conn, key + "x") is None
        assert credentials.active_admins(conn) == ["admin"]
        ops = credentials.get_key(conn, "ops")
        assert (ops.role, ops.created_at, ops.revoked_at) == ("deploy", isoformat(T0), None)
        # Only the hash is stored.
        stored = conn.execute("SELECT key_hash FROM api_keys WHERE name = ?", ("ops",)).fetchone()
        assert stored["key_hash"] == credentials.digest(key) != key
    later = T0 + timedelta(minutes=1)
    with any_store.transaction() as conn:
        credentials.revoke_key(conn, "ops", later)
    with any_store.read() as conn:
        assert credentials.key_role(conn, key) is None
        assert [k.name for k in credentials.list_keys(conn, include_revoked=False)] == ["admin"]
        everything = credentials.list_keys(conn)
    assert [(k.name, k.revoked_at) for k in everything] == [
        ("admin", None),
        ("ops", isoformat(later)),
    ]


def test_a_taken_name_conflicts_and_a_revoked_one_is_reused(any_store: AnyStore) -> None:
    with any_store.transaction() as conn:
        first = credentials.create_key(conn, "ci", "readonly", "test", T0)
    with pytest.raises(ConflictError), any_store.transaction() as conn:
        credentials.create_key(conn, "ci", "deploy", "test", T0)
    with any_store.transaction() as conn:
        credentials.revoke_key(conn, "ci", T0)
        second = credentials.create_key(conn, "ci", "deploy", "test", T0 + timedelta(1))
    with any_store.read() as conn:
        assert credentials.key_role(conn, first) is None
        assert credentials.key_role(conn, second) == ("ci", "deploy")
        assert credentials.get_key(conn, "ci").revoked_at is None


def test_bad_names_roles_and_unknown_keys_are_refused(any_store: AnyStore) -> None:
    with pytest.raises(ValidationError), any_store.transaction() as conn:
        credentials.create_key(conn, "no spaces", "admin", "test", T0)
    with pytest.raises(ValidationError), any_store.transaction() as conn:
        credentials.create_key(conn, "ok", "root", "test", T0)
    with pytest.raises(NotFoundError), any_store.transaction() as conn:
        credentials.revoke_key(conn, "nobody", T0)
    with pytest.raises(NotFoundError), any_store.read() as conn:
        credentials.get_key(conn, "nobody")
    with any_store.read() as conn:
        assert credentials.list_keys(conn) == []


def test_an_imported_key_is_installed_once(any_store: AnyStore) -> None:
    secret = credentials.KEY_PREFIX + "from-the-host-key-file"
    with any_store.transaction() as conn:
        assert credentials.import_key(conn, "admin", "admin", secret, "host", T0)
        assert not credentials.import_key(conn, "admin", "admin", secret, "host", T0)
    with any_store.read() as conn:
        assert credentials.key_role(conn, secret) == ("admin", "admin")


def test_a_failed_transaction_writes_nothing(any_store: AnyStore) -> None:
    with pytest.raises(RuntimeError), any_store.transaction() as conn:
        credentials.create_key(conn, "gone", "admin", "test", T0)
        audit.record(conn, "key:test", "key.create", "gone", T0)
        raise RuntimeError("abort")
    with any_store.read() as conn:
        assert credentials.list_keys(conn) == []
        assert audit.query(conn) == []


def test_the_audit_log_keeps_actor_detail_and_order(any_store: AnyStore) -> None:
    with any_store.transaction() as conn:
        for i in range(5):
            audit.record(
                conn,
                "key:ops" if i % 2 else "key:ci",
                "machine.register",
                f"web-{i:02d}",
                T0 + timedelta(seconds=i),
                {"tags": ["prod"], "n": i, "text": "50% done; 'quoted' ?"},
            )
    with any_store.read() as conn:
        newest_first = audit.query(conn)
        by_ops = audit.query(conn, actor="key:ops")
        one = audit.query(conn, target="web-03", action="machine.register")
        limited = audit.query(conn, limit=2)
        nothing = audit.query(conn, actor="key:nobody")
    assert [e.target for e in newest_first] == [f"web-{i:02d}" for i in (4, 3, 2, 1, 0)]
    assert [e.id for e in newest_first] == sorted((e.id for e in newest_first), reverse=True)
    assert newest_first[0].at == isoformat(T0 + timedelta(seconds=4))
    assert newest_first[0].detail == {"n": 4, "tags": ["prod"], "text": "50% done; 'quoted' ?"}
    assert [e.target for e in by_ops] == ["web-03", "web-01"]
    assert [(e.actor, e.target) for e in one] == [("key:ops", "web-03")]
    assert [e.target for e in limited] == ["web-04", "web-03"]
    assert nothing == []


def test_concurrent_writers_each_commit(any_store: AnyStore) -> None:
    """Requests of several threads, each its own transaction (the pool on PostgreSQL)."""
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(10):
                with any_store.transaction() as conn:
                    audit.record(conn, f"key:t{n}", "test", f"t{n}-{i}", T0)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with any_store.read() as conn:
        assert len(audit.query(conn, limit=1000)) == 40
        assert len(audit.query(conn, actor="key:t2", limit=1000)) == 10


def test_migrations_are_recorded_and_not_applied_twice(any_store: AnyStore) -> None:
    applied = any_store.applied_migrations()
    assert applied
    assert any_store.migrate() == []
    assert any_store.applied_migrations() == applied
    assert any_store.readiness() is None


def test_machine_tokens_are_issued_rotated_and_revoked(any_store: AnyStore) -> None:
    with any_store.transaction() as conn:
        machines.register(conn, "web-01", [], Lifecycle.ACTIVE, T0)
        machines.register(conn, "web-02", [], Lifecycle.PENDING, T0)
        first = credentials.issue_token(conn, "web-01", T0)
        other = credentials.issue_token(conn, "web-02", T0)
    assert first.startswith(credentials.TOKEN_PREFIX)
    with any_store.read() as conn:
        assert credentials.token_machine(conn, first) == "web-01"
        assert credentials.token_machine_lifecycle(conn, other) == ("web-02", "pending")
        assert credentials.has_token(conn, "web-01")
        assert credentials.token_machine(conn, "nfm_unknown") is None
    with any_store.transaction() as conn:  # rotating: the old token stops working at once
        second = credentials.issue_token(conn, "web-01", T0 + timedelta(seconds=1))
    with any_store.read() as conn:
        assert credentials.token_machine(conn, first) is None
        assert credentials.token_machine(conn, second) == "web-01"
    with any_store.transaction() as conn:
        assert credentials.revoke_token(conn, "web-01")
        assert not credentials.revoke_token(conn, "web-01")
    with any_store.read() as conn:
        assert credentials.token_machine(conn, second) is None
        assert not credentials.has_token(conn, "web-01")
        assert credentials.token_machine(conn, other) == "web-02"
