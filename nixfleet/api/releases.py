"""Release resources: register, list, show, diff, delete."""

from __future__ import annotations

import falcon

from nixfleet import wire
from nixfleet.api import params
from nixfleet.api.auth import Perm
from nixfleet.api.body import read_json
from nixfleet.api.context import Context
from nixfleet.errors import NotFoundError
from nixfleet.flake import RELEASE_SCHEMA, release_document, release_from_document
from nixfleet.models import (
    RELEASE_ID_DIGITS,
    RELEASE_ID_PREFIX,
    Release,
    is_release_id,
    isoformat,
    utcnow,
)
from nixfleet.store import audit, releases

LIMIT = params.limit(10_000, what="releases (newest first)")


def _check_id(release_id: str) -> None:
    if not is_release_id(release_id):
        raise NotFoundError(
            f"{release_id!r} is not a release id "
            f"({RELEASE_ID_PREFIX} + {RELEASE_ID_DIGITS} hex digits)"
        )


def summary_json(r: releases.ReleaseSummary) -> wire.ReleaseSummary:
    return {
        "id": r.id,
        "flake_ref": r.flake_ref,
        "flake_rev": r.flake_rev,
        "cache_url": r.cache_url,
        "created_at": isoformat(r.created_at),
        "created_by": r.created_by,
        "hosts": r.hosts,
        "rollouts": r.rollouts,
        "pruned_at": isoformat(r.pruned_at),
    }


def diff_json(a: Release, b: Release) -> wire.ReleaseDiff:
    """Per host: added (only in b), removed (only in a), changed store path, unchanged."""
    pa = {e.hostname: e.store_path for e in a.entries}
    pb = {e.hostname: e.store_path for e in b.entries}
    return {
        "from": a.id,
        "to": b.id,
        "added": [{"hostname": h, "store_path": pb[h]} for h in sorted(pb.keys() - pa.keys())],
        "removed": [{"hostname": h, "store_path": pa[h]} for h in sorted(pa.keys() - pb.keys())],
        "changed": [
            {"hostname": h, "from": pa[h], "to": pb[h]}
            for h in sorted(pa.keys() & pb.keys())
            if pa[h] != pb[h]
        ],
        "unchanged": sorted(h for h in pa.keys() & pb.keys() if pa[h] == pb[h]),
    }


class ReleaseCollection:
    permissions = {"GET": Perm.READONLY, "POST": Perm.DEPLOY}
    schemas = {"POST": RELEASE_SCHEMA}
    query = {"GET": [LIMIT]}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List releases, newest first, with host and rollout counts."""
        limit = LIMIT.read(req)
        with self.ctx.store.read() as conn:
            listed = releases.list_releases(conn, limit)
        resp.media = {"releases": [summary_json(r) for r in listed]}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Register a release; the same entries again return the existing one (200)."""
        release = release_from_document(read_json(req, self.ctx.limit))
        now = utcnow()
        actor = req.context.actor.label
        with self.ctx.store.transaction() as conn:
            created = releases.insert(conn, release, now, actor)
            if created:
                audit.record(
                    conn,
                    actor,
                    "release.create",
                    release.id,
                    now,
                    {"hosts": len(release.entries), "flake_rev": release.flake_rev},
                )
            stored = releases.get(conn, release.id)
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.location = f"/api/v1/releases/{release.id}"
        resp.media = {**release_document(stored), "created": created}


class ReleaseItem:
    permissions = {"GET": Perm.READONLY, "DELETE": Perm.ADMIN}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, release_id: str) -> None:
        """One release with all its entries."""
        _check_id(release_id)
        with self.ctx.store.read() as conn:
            resp.media = release_document(releases.get(conn, release_id))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, release_id: str) -> None:
        """Delete a release; refused (409) while any rollout references it."""
        _check_id(release_id)
        now = utcnow()
        with self.ctx.store.transaction() as conn:
            releases.delete(conn, release_id)
            audit.record(conn, req.context.actor.label, "release.delete", release_id, now)
        resp.status = falcon.HTTP_204


class ReleaseDiff:
    permissions = {"GET": Perm.READONLY}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_get(
        self, req: falcon.Request, resp: falcon.Response, release_id: str, other: str
    ) -> None:
        """Per host: added, removed and changed store paths from release_id to other."""
        _check_id(release_id)
        _check_id(other)
        with self.ctx.store.read() as conn:
            a, b = releases.get(conn, release_id), releases.get(conn, other)
        resp.media = diff_json(a, b)
