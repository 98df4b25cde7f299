"""Enrollment tokens on both backends (SQLite, PostgreSQL): uses, expiry, globs, races."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from nixfleet.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from nixfleet.models import isoformat
from nixfleet.store import enrollment
from nixfleet.store.conn import AnyStore

T0 = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def new_token(
    store: AnyStore, uses: int = 2, glob: str | None = None, tags: list[str] | None = None
) -> tuple[enrollment.EnrollToken, str]:
    with store.transaction() as conn:
        return enrollment.create(
            conn,
            uses=uses,
            lifetime=timedelta(hours=1),
            tags=tags if tags is not None else ["prod", "web", "prod"],
            hostname_glob=glob,
            created_by="key:ops",
            now=T0,
        )


def test_a_token_is_created_listed_and_used_up(any_store: AnyStore) -> None:
    token, secret = new_token(any_store)
    assert secret.startswith(enrollment.ENROLL_PREFIX)
    assert (token.uses_left, token.uses_total, token.tags) == (2, 2, ("prod", "web"))
    assert token.expires_at == isoformat(T0 + timedelta(hours=1))
    assert token.state(T0) == "active"
    with any_store.transaction() as conn:
        enrollment.redeem(conn, secret, "web-01", T0 + timedelta(minutes=1))
        enrollment.redeem(conn, secret, "web-02", T0 + timedelta(minutes=2))
    with any_store.read() as conn:
        after = enrollment.get(conn, token.id)
        assert [t.id for t in enrollment.list_tokens(conn)] == [token.id]
    assert (after.uses_left, after.state(T0)) == (0, "used-up")
    assert after.last_used_at == isoformat(T0 + timedelta(minutes=2))
    with pytest.raises(AuthenticationError, match="used-up"), any_store.transaction() as conn:
        enrollment.redeem(conn, secret, "web-03", T0)


def test_unknown_revoked_expired_and_foreign_tokens_are_refused(any_store: AnyStore) -> None:
    token, secret = new_token(any_store, glob="web-*")
    with pytest.raises(AuthenticationError, match="unknown"), any_store.transaction() as conn:
        enrollment.redeem(conn, secret + "x", "web-01", T0)
    with pytest.raises(PermissionDeniedError, match="web-"), any_store.transaction() as conn:
        enrollment.redeem(conn, secret, "db-01", T0)
    with pytest.raises(AuthenticationError, match="expired"), any_store.transaction() as conn:
        enrollment.redeem(conn, secret, "web-01", T0 + timedelta(hours=1))
    with any_store.transaction() as conn:
        revoked = enrollment.revoke(conn, token.id, T0)
        again = enrollment.revoke(conn, token.id, T0 + timedelta(1))  # idempotent
    assert revoked.revoked_at == again.revoked_at == isoformat(T0)
    with pytest.raises(AuthenticationError, match="revoked"), any_store.transaction() as conn:
        enrollment.redeem(conn, secret, "web-01", T0)
    with pytest.raises(NotFoundError), any_store.read() as conn:
        enrollment.get(conn, "et-000000000000")
    with any_store.read() as conn:
        assert enrollment.get(conn, token.id).uses_left == 2  # refusals used nothing


def test_a_failed_registration_gives_the_use_back(any_store: AnyStore) -> None:
    token, secret = new_token(any_store, uses=1)
    with pytest.raises(RuntimeError), any_store.transaction() as conn:
        enrollment.redeem(conn, secret, "web-01", T0)
        raise RuntimeError("the registration failed after the redeem")
    with any_store.read() as conn:
        assert enrollment.get(conn, token.id).uses_left == 1


def test_agents_racing_for_the_last_use_cannot_both_win(any_store: AnyStore) -> None:
    _, secret = new_token(any_store, uses=3)
    won: list[str] = []
    lost: list[str] = []
    start = threading.Barrier(8)

    def enroll(n: int) -> None:
        start.wait(timeout=30)
        try:
            with any_store.transaction() as conn:
                enrollment.redeem(conn, secret, f"web-{n:02d}", T0)
            won.append(f"web-{n:02d}")
        except AuthenticationError:
            lost.append(f"web-{n:02d}")

    threads = [threading.Thread(target=enroll, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert (len(won), len(lost)) == (3, 5)
