-- 0011_webhooks_failure_output (shipped: append-only, never edited)
-- machines.failed_output: the tail of a failed switch's output, kept with the failure.
-- rollouts.confirm_timeout: seconds, from the document, for the report answer (no
-- earlier document has one: the schema refused it).
-- Webhooks (docs/webhooks.md): an outbox row per event, written by triggers in the
-- very transaction of the change (a rollout event, a newly failed generation), so
-- no code path can forget one and none is sent for a change that rolled back. The
-- sender fans each row out to a delivery per subscribed URL and keeps every attempt.
ALTER TABLE machines ADD COLUMN failed_output TEXT;
ALTER TABLE rollouts ADD COLUMN confirm_timeout INTEGER;
CREATE TABLE webhook_outbox (
    id INTEGER PRIMARY KEY,
    event TEXT NOT NULL,
    at TEXT NOT NULL,
    rollout_id TEXT,
    machine_id TEXT,
    detail_json TEXT NOT NULL DEFAULT '{}',
    fanned_out INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX webhook_outbox_new ON webhook_outbox (id) WHERE fanned_out = 0;
CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY,
    outbox_id INTEGER NOT NULL REFERENCES webhook_outbox (id) ON DELETE CASCADE,
    url TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    next_attempt_at TEXT NOT NULL,
    last_attempt_at TEXT,
    last_status INTEGER,
    last_error TEXT,
    finished_at TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (url, next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_outbox ON webhook_deliveries (outbox_id);
CREATE TABLE webhook_attempts (
    id INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    at TEXT NOT NULL,
    status INTEGER,
    error TEXT,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
CREATE TABLE webhook_stale (
    machine_id TEXT PRIMARY KEY,
    last_report_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER webhook_rollout_event AFTER INSERT ON rollout_events
WHEN NEW.kind IN ('rollout-created', 'rollout-paused', 'rollout-resumed',
    'rollout-failed', 'rollout-completed', 'rollout-cancelled', 'batch-started',
    'machine-unhealthy') BEGIN
    INSERT INTO webhook_outbox (event, at, rollout_id, machine_id, detail_json)
    VALUES (CASE NEW.kind WHEN 'rollout-created' THEN 'rollout.started'
            WHEN 'batch-started' THEN 'batch.started'
            WHEN 'machine-unhealthy' THEN 'machine.unhealthy'
            ELSE 'rollout.' || substr(NEW.kind, 9) END,
        NEW.at, NEW.rollout_id, NEW.machine_id,
        CASE WHEN NEW.batch_idx IS NULL THEN NEW.detail_json
            ELSE json_set(NEW.detail_json, '$.batch', NEW.batch_idx) END);
END;
CREATE TRIGGER webhook_machine_failed AFTER UPDATE OF failed_generation ON machines
WHEN NEW.failed_generation IS NOT NULL
    AND NEW.failed_generation IS NOT OLD.failed_generation BEGIN
    INSERT INTO webhook_outbox (event, at, rollout_id, machine_id, detail_json)
    VALUES ('machine.failed', coalesce(NEW.last_report_at,
            strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')),
        (SELECT rm.rollout_id FROM rollout_machines rm
            JOIN rollouts r ON r.id = rm.rollout_id
            WHERE rm.machine_id = NEW.id AND r.status IN ('running', 'paused')
            ORDER BY r.created_at DESC LIMIT 1),
        NEW.id,
        json_object('generation', NEW.failed_generation,
            'current_generation', NEW.current_generation,
            'message', NEW.last_message));
END;
