"""create_app(settings, store): the route table, middleware and error handling.

ROUTES is the single list of what the API serves; the OpenAPI document, the
permission matrix test and the docs are all generated from it.
"""

from __future__ import annotations

from typing import Any

import falcon

from nixfleet.api import (
    audit,
    enroll,
    errors,
    health,
    history,
    keys,
    leases,
    machines,
    openapi,
    releases,
    report,
    rollouts,
    status,
    webhooks,
)
from nixfleet.api.auth import AuthMiddleware
from nixfleet.api.context import Context
from nixfleet.api.report_cache import ReportCache
from nixfleet.api.status_view import StatusView
from nixfleet.settings import Settings
from nixfleet.store.conn import AnyStore

ROUTES: list[tuple[str, type[Any]]] = [
    ("/health", status.Health),
    ("/ready", health.Ready),
    ("/metrics", status.Metrics),
    ("/api/v1/openapi.json", openapi.OpenAPI),
    ("/api/v1/status", status.Status),
    ("/api/v1/machines", machines.MachineCollection),
    ("/api/v1/machines/{machine_id}", machines.MachineItem),
    ("/api/v1/machines/{machine_id}/report", report.MachineReport),
    ("/api/v1/machines/{machine_id}/history", history.MachineHistory),
    ("/api/v1/machines/{machine_id}/lifecycle", machines.MachineLifecycle),
    ("/api/v1/machines/{machine_id}/tags", machines.MachineTags),
    ("/api/v1/machines/{machine_id}/desired-generation", machines.DesiredGeneration),
    ("/api/v1/machines/{machine_id}/retry", machines.MachineRetry),
    ("/api/v1/machines/{machine_id}/reboot-lease", leases.RebootLease),
    ("/api/v1/machines/{machine_id}/token", keys.MachineToken),
    ("/api/v1/keys", keys.KeyCollection),
    ("/api/v1/keys/{name}", keys.KeyItem),
    ("/api/v1/enroll-tokens", enroll.EnrollTokenCollection),
    ("/api/v1/enroll-tokens/{token_id}", enroll.EnrollTokenItem),
    ("/api/v1/enroll", enroll.Enroll),
    ("/api/v1/audit", audit.AuditLog),
    ("/api/v1/releases", releases.ReleaseCollection),
    ("/api/v1/releases/{release_id}", releases.ReleaseItem),
    ("/api/v1/releases/{release_id}/diff/{other}", releases.ReleaseDiff),
    ("/api/v1/rollouts", rollouts.RolloutCollection),
    ("/api/v1/rollouts/plan", rollouts.RolloutPlan),
    ("/api/v1/rollouts/{rollout_id}", rollouts.RolloutItem),
    ("/api/v1/rollouts/{rollout_id}/pause", rollouts.RolloutPause),
    ("/api/v1/rollouts/{rollout_id}/resume", rollouts.RolloutResume),
    ("/api/v1/rollouts/{rollout_id}/cancel", rollouts.RolloutCancel),
    ("/api/v1/webhooks/deliveries", webhooks.WebhookDeliveries),
]


def create_app(
    settings: Settings,
    store: AnyStore,
    cache: ReportCache | None = None,
    status_view: StatusView | None = None,
) -> falcon.App[falcon.Request, falcon.Response]:
    """The API; with `cache` (the server's, started by it) heartbeats skip SQLite.

    The whole fleet's status is kept in `status_view` (a new one, loaded by the first
    such request, when none is given)."""
    ctx = Context(
        settings=settings, store=store, cache=cache, status_view=status_view or StatusView(store)
    )
    app = falcon.App(middleware=[AuthMiddleware(store, cache)], cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.resp_options.default_media_type = falcon.MEDIA_JSON
    errors.register(app)
    for path, resource in ROUTES:
        app.add_route(path, resource(ctx))
    if settings.ui:
        from nixfleet import ui  # the dashboard (and Jinja2) only when it is served

        ui.mount(app, ctx)
    return app
