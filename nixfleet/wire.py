"""The JSON shapes of the HTTP API (DESIGN §4), written once as TypedDicts.

The client returns these and the CLI renders them; the API may annotate what it
builds with the same names, so a field renamed on one side is a type error on the
other. Times are RFC 3339 UTC strings, generations full store paths or None.
The client checks the required keys before handing a body on: a server that
answers without them is not the nixfleet API this client speaks. (No `from __future__
import annotations` here: TypedDict must see NotRequired at class creation.)
"""

from typing import Any, NotRequired, TypedDict, final

# --- JSON in general ---------------------------------------------------------------

JSONObject = dict[str, Any]
"""A JSON object whose keys are not fixed by the API: an event's `detail` (its keys
depend on the event's kind), a document before its schema accepted it, a JSON Schema
or the OpenAPI document. The one spelling of a free-form object; every shape that is
fixed has its TypedDict below (docs/architecture.md lists where this one is used)."""


RolloutDocument = JSONObject
"""A rollout document (API body, GitOps file, what `deploy` builds): its one shape is
schemas/rollout.schema.json, validated where it enters; rollout.spec_from_document
turns it into the typed RolloutSpec."""


class FieldErrorBody(TypedDict):
    """One field's problem in a problem+json body (errors.FieldError on the wire)."""

    field: str
    message: str
    line: NotRequired[int]


class Problem(TypedDict):
    """Every error answer (application/problem+json, RFC 9457)."""

    type: str
    title: str
    status: int
    detail: str
    errors: NotRequired[list[FieldErrorBody]]


# --- machines ---------------------------------------------------------------------


class HealthCheck(TypedDict):
    name: str
    kind: str
    passed: bool
    duration_ms: NotRequired[int]
    message: NotRequired[str]


class Health(TypedDict):
    all_passed: bool
    results: list[HealthCheck]


class StatusMachine(TypedDict):
    """One row of `GET /api/v1/status` (the columns `nixfleet status` shows)."""

    id: str
    lifecycle: str
    current_generation: str | None
    desired_generation: str | None
    sync: str
    health_status: str  # healthy, failing or unknown (models.health_of)
    failed_generation: str | None
    system_state: str
    last_message: str | None
    needs_reboot: NotRequired[bool | None]  # DESIGN §11: NEEDS REBOOT
    tags: list[str]
    last_report_at: str | None
    stale: bool


class Machine(TypedDict):
    """A machine as `GET /api/v1/machines` and every machine mutation answer it."""

    id: str
    lifecycle: str
    tags: list[str]
    agent_tags: list[str]
    operator_tags: list[str]
    current_generation: str | None
    desired_generation: str | None
    desired_cache_url: str | None
    desired_source: str | None
    sync: str
    health_status: str  # healthy, failing or unknown (models.health_of)
    failed_generation: str | None
    last_report_at: str | None
    stale: bool
    system_state: str
    last_success: bool | None
    last_message: str | None
    agent_version: str | None
    registered_at: str | None
    retry_requested_at: str | None
    needs_reboot: NotRequired[bool | None]
    booted_generation: NotRequired[str | None]


class HistoryEvent(TypedDict):
    """One change in a machine's history (DESIGN §3 History); `kind` is a history.EventKind.

    generation/desired: `generation` is where it went, `previous` where it came from
    (None: none, or before the oldest event kept); failures: `generation` is the one
    that failed, detail.reason why; health, tags and lifecycle say it in `detail`.
    """

    id: int
    at: str
    kind: str
    source: str  # "agent", a rollout's label, or the operator (e.g. "key:ops")
    generation: str | None
    previous: str | None
    detail: JSONObject


class MachineHistory(TypedDict):
    """`GET /api/v1/machines/{id}/history`: one page, oldest first."""

    machine_id: str
    events: list[HistoryEvent]
    next_after: int | None  # `after` for the next page; None: no more


class MachineDetail(Machine):
    """`GET /api/v1/machines/{id}`: the machine, its latest health and history events."""

    health: Health | None
    uptime_seconds: int | None  # as of the last report
    history: list[HistoryEvent]
    failed_output: NotRequired[str | None]  # the failed switch's output tail


class RegisteredMachine(Machine):
    token: NotRequired[str]


class MachineList(TypedDict):
    machines: list[Machine]


class Summary(TypedDict):
    total: int
    in_sync: int
    updating: int
    failed: int
    no_desired: int
    stale: int
    by_health: dict[str, int]
    by_lifecycle: dict[str, int]


class Status(TypedDict):
    generated_at: str
    stale_after_seconds: int
    summary: Summary
    machines: list[StatusMachine]


class BootFields(TypedDict):
    """The report's DESIGN §11 fields: what the machine booted, and whether it must."""

    needs_reboot: NotRequired[bool]
    booted_generation: NotRequired[str]


class ReportBody(BootFields):
    """`POST /api/v1/machines/{id}/report` (schemas/report.schema.json)."""

    current_generation: str
    tags: NotRequired[list[str]]
    success: NotRequired[bool]
    message: NotRequired[str]
    output: NotRequired[str]  # the failed switch's output tail, sent once
    attempted_generation: NotRequired[str]
    health: NotRequired[Health]
    agent_version: NotRequired[str]
    uptime_seconds: NotRequired[int]


class ReportAnswer(TypedDict):
    desired_generation: str | None
    cache_url: str | None
    poll_hint: int | None
    retry_requested_at: NotRequired[str | None]
    confirm_timeout: NotRequired[int | None]  # seconds: the rollout's confirm window
    reboot: NotRequired[str]  # "when-needed": the agent may ask for a reboot lease


class DesiredGeneration(TypedDict):
    desired_generation: str | None
    cache_url: str | None
    source: NotRequired[str | None]


# --- credentials -------------------------------------------------------------------


class Key(TypedDict):
    name: str
    role: str
    created_at: str
    created_by: str
    revoked_at: str | None
    active: bool


class CreatedKey(Key):
    key: str


class KeyList(TypedDict):
    keys: list[Key]


class MachineToken(TypedDict):
    machine_id: str
    token: str
    rotated: bool


class RevokedToken(TypedDict):
    machine_id: str
    revoked: bool


class EnrollToken(TypedDict):
    id: str
    state: str
    uses_left: int
    uses_total: int
    expires_at: str
    tags: list[str]
    hostname_glob: str | None
    created_at: str
    created_by: str
    revoked_at: str | None
    last_used_at: str | None


class EnrollTokenCreate(TypedDict):
    """`POST /api/v1/enroll-tokens` (schemas/enroll-token-create.schema.json)."""

    uses: NotRequired[int]
    expires_in_seconds: NotRequired[int]
    tags: NotRequired[list[str]]
    hostname_glob: NotRequired[str]


class CreatedEnrollToken(EnrollToken):
    token: str


class EnrollTokenList(TypedDict):
    enroll_tokens: list[EnrollToken]


class Enrolled(TypedDict):
    machine_id: str
    token: str
    enrolled_at: str


class AuditEntry(TypedDict):
    id: int
    at: str
    actor: str
    action: str
    target: str
    detail: JSONObject


class AuditLog(TypedDict):
    entries: list[AuditEntry]


# --- releases ----------------------------------------------------------------------


class ReleaseEntry(TypedDict):
    hostname: str
    store_path: str
    platform: str
    tags: list[str]


class ReleaseHeader(TypedDict):
    """A release but its entries; absent values are omitted (release TOML has no null)."""

    id: str
    flake_ref: NotRequired[str]
    flake_rev: NotRequired[str]
    cache_url: NotRequired[str]
    created_by: NotRequired[str]
    created_at: NotRequired[str]


class Release(ReleaseHeader):
    entries: list[ReleaseEntry]


class RegisteredRelease(Release):
    created: bool


class ReleaseSummary(TypedDict):
    id: str
    flake_ref: str | None
    flake_rev: str | None
    cache_url: str | None
    created_at: str
    created_by: str
    hosts: int
    rollouts: int
    pruned_at: str | None  # its entries were pruned (docs/releases.md "Retention")


class ReleaseList(TypedDict):
    releases: list[ReleaseSummary]


class HostPath(TypedDict):
    hostname: str
    store_path: str


ChangedHost = TypedDict("ChangedHost", {"hostname": str, "from": str, "to": str})
ReleaseDiff = TypedDict(
    "ReleaseDiff",
    {
        "from": str,
        "to": str,
        "added": list[HostPath],
        "removed": list[HostPath],
        "changed": list[ChangedHost],
        "unchanged": list[str],
    },
)


# --- rollouts ----------------------------------------------------------------------


class Skipped(TypedDict):
    hostname: str
    reason: str


class PlannedBatch(TypedDict):
    index: int
    size: int
    hosts: list[str]
    # DESIGN §11, where windows or a budget apply:
    earliest_start: NotRequired[str | None]
    waiting_for_window: NotRequired[str | None]
    at_once: NotRequired[int]
    held_by: NotRequired[str]


class HostCost(TypedDict):
    """`rollout plan --closures`, per host (computed by the CLI with real nix)."""

    download_bytes: int | None
    needs_reboot: bool | None
    diff: str | None


class TargetWarning(TypedDict):
    """A target of plan/apply that will not follow as things stand (DESIGN §3 Lifecycle)."""

    hostname: str
    kind: str  # "decommissioned" or "stale"
    detail: str
    last_report_at: str | None


class Plan(TypedDict):
    name: str
    release: str
    strategy: str
    targets: int
    batches: list[PlannedBatch]
    skipped: list[Skipped]
    warnings: list[TargetWarning]
    hosts: NotRequired[dict[str, HostCost]]


class RolloutMachine(TypedDict):
    id: str
    health: str
    reason: str
    store_path: str | None
    current_generation: str | None
    last_report_at: str | None
    # The failed switch's output tail (last 4 KiB), for the first 20 unhealthy machines
    # whose failure is the rollout's generation.
    failed_output: NotRequired[str]


class Batch(TypedDict):
    index: int
    status: str
    size: int
    started_at: str | None
    finished_at: str | None
    machines: list[RolloutMachine]  # none once the rollout's machines are pruned
    counts: dict[str, int]  # machines by health (kept when the machines are pruned)


class RolloutEvent(TypedDict):
    at: str
    kind: str
    batch: int | None
    machine: str | None
    detail: JSONObject


class Hold(TypedDict):
    kind: str
    detail: str


class RolloutSummary(TypedDict):
    """What a rollout's listing and its detail both say of it."""

    id: str
    name: str
    release: str
    status: str
    source: str
    created_at: str
    created_by: str
    updated_at: str
    # When its per-machine rows were pruned (docs/rollouts.md "Retention"), else null.
    machines_pruned_at: str | None


class Rollout(RolloutSummary):
    """`GET /api/v1/rollouts/{id}` and the answer of apply/pause/resume/cancel."""

    document: RolloutDocument  # as applied
    skipped: list[Skipped]
    batches: list[Batch]
    events: list[RolloutEvent]
    hold: NotRequired[Hold | None]  # DESIGN §11: waiting-for-window, held-by-budget


class RebootLease(TypedDict):
    group: str
    machine: str
    acquired_at: str
    expires_at: str


class RebootLeases(TypedDict):
    """`POST /api/v1/machines/{id}/reboot-lease` (409 when not now, saying why)."""

    granted: bool
    leases: list[RebootLease]


class ReleasedLeases(TypedDict):
    released: int


class AppliedRollout(Rollout):
    created: bool
    warnings: list[TargetWarning]  # as in Plan, for the rollout's machines


@final
class ListedRollout(RolloutSummary):
    """A rollout in `GET /api/v1/rollouts`, with its machines counted by health."""

    machines: dict[str, int]


@final
class InvalidRolloutFile(TypedDict):
    """An invalid GitOps file in `GET /api/v1/rollouts` (`"file" in item` tells them apart)."""

    id: None
    name: str | None
    status: str  # "invalid"
    updated_at: str | None
    file: str
    errors: list[FieldErrorBody]


RolloutListItem = ListedRollout | InvalidRolloutFile


class RolloutList(TypedDict):
    rollouts: list[RolloutListItem]


class ServiceHealth(TypedDict):
    status: str
    version: str


# --- webhooks ----------------------------------------------------------------------


class WebhookRollout(TypedDict):
    id: str
    name: str | None


class WebhookEvent(TypedDict):
    """The signed body a receiver gets (schemas/webhook-event.schema.json)."""

    id: int
    event: str
    at: str
    rollout: WebhookRollout | None
    machine: str | None
    detail: JSONObject


class WebhookAttempt(TypedDict):
    at: str
    status: int | None
    error: str | None
    duration_ms: int


class WebhookDelivery(TypedDict):
    id: int
    url: str
    state: str  # pending | delivered | failed (given up)
    attempts: int
    created_at: str
    expires_at: str
    next_attempt_at: str | None
    last_attempt_at: str | None
    last_status: int | None
    last_error: str | None
    finished_at: str | None
    event: WebhookEvent
    history: list[WebhookAttempt]


class WebhookDeliveries(TypedDict):
    deliveries: list[WebhookDelivery]


# --- the OpenAPI document (GET /api/v1/openapi.json) -------------------------------
# Its operations are built by api/openapi.py from the route table; the schemas inside
# are those of schemas/ (JSONObject), and so is the document as a whole.

OpenAPIParameter = TypedDict(
    "OpenAPIParameter",
    {
        "name": str,
        "in": str,  # "path" or "query"
        "required": bool,
        "schema": JSONObject,
        "description": NotRequired[str],
    },
)

OpenAPIOperation = TypedDict(
    "OpenAPIOperation",
    {
        "operationId": str,
        "summary": str,
        "security": list[dict[str, list[str]]],
        "x-nixfleet-permission": str,
        "responses": JSONObject,
        "requestBody": NotRequired[JSONObject],
        "parameters": NotRequired[list[OpenAPIParameter]],
    },
)
