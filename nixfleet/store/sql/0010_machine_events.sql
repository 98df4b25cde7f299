-- 0010_machine_events (shipped: append-only, never edited)
-- History of changes (DESIGN §3 History, nixfleet.store.history): a heartbeat appends
-- nothing, each change is one machine_events row. The report rows are carried over as
-- the changes they show: each machine's kept reports (at most report_retention, by
-- default 100, i.e. the last ~100 minutes) are compared with the report before them;
-- a generation switch, a new failure (rolled back when the agent said so) and a turn of
-- health (passing/failing, naming the checks failing after it) become events at the
-- report's time. The first kept report of each machine has nothing to compare with
-- and yields none; per-check changes while health stays failing are not recovered.
-- Then the reports table goes: nothing reads it any more.
-- Every change of machines.desired_generation, by any statement (the reconciler's
-- set-based ones included), is an event written by the trigger, its source the new
-- desired source (a rollout's label, or "operator").
CREATE TABLE machine_events (
    id INTEGER PRIMARY KEY,
    machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    at TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('generation', 'deployment-failed',
        'rolled-back', 'health', 'tags', 'lifecycle', 'desired')),
    source TEXT NOT NULL,
    generation TEXT,
    detail_json TEXT
);
CREATE INDEX machine_events_machine ON machine_events (machine_id, id);
INSERT INTO machine_events (machine_id, at, kind, source, generation, detail_json)
SELECT machine_id, received_at, kind, 'agent', generation, detail FROM (
    SELECT id, machine_id, received_at, 0 AS o, 'generation' AS kind,
        current_generation AS generation, NULL AS detail
    FROM (SELECT *, lag(current_generation) OVER w AS prev_gen,
        row_number() OVER w AS n FROM reports
        WINDOW w AS (PARTITION BY machine_id ORDER BY id))
    WHERE n > 1 AND prev_gen IS NOT current_generation
    UNION ALL
    SELECT id, machine_id, received_at, 1,
        CASE WHEN message LIKE 'rolled back%'
            AND current_generation IS NOT attempted_generation
            THEN 'rolled-back' ELSE 'deployment-failed' END,
        attempted_generation, json_object('reason', message)
    FROM (SELECT *, lag(success) OVER w AS prev_success,
        lag(attempted_generation) OVER w AS prev_attempted,
        row_number() OVER w AS n FROM reports
        WINDOW w AS (PARTITION BY machine_id ORDER BY id))
    WHERE n > 1 AND success = 0
        AND (prev_success = 1 OR prev_attempted IS NOT attempted_generation)
    UNION ALL
    SELECT id, machine_id, received_at, 2, 'health', NULL, json_object(
        'status', CASE ok WHEN 1 THEN 'healthy' WHEN 0 THEN 'failing'
            ELSE 'unknown' END,
        'previous', CASE prev_ok WHEN 1 THEN 'healthy' WHEN 0 THEN 'failing'
            ELSE 'unknown' END,
        'failing', json((SELECT coalesce(json_group_array(
            json_extract(c.value, '$.name')), '[]')
            FROM json_each(health_json, '$.results') c
            WHERE json_extract(c.value, '$.passed') = 0)),
        'newly_failing', json('[]'), 'recovered', json('[]'))
    FROM (SELECT *, json_extract(health_json, '$.all_passed') AS ok,
        lag(json_extract(health_json, '$.all_passed')) OVER w AS prev_ok,
        row_number() OVER w AS n FROM reports
        WINDOW w AS (PARTITION BY machine_id ORDER BY id))
    WHERE n > 1 AND ok IS NOT prev_ok
) ORDER BY received_at, id, o;
DROP TABLE reports;
CREATE TRIGGER machine_desired_changed AFTER UPDATE OF desired_generation ON machines
WHEN OLD.desired_generation IS NOT NEW.desired_generation BEGIN
    INSERT INTO machine_events (machine_id, at, kind, source, generation)
    VALUES (NEW.id, coalesce(NEW.desired_set_at, strftime('%Y-%m-%dT%H:%M:%f') || '000Z'),
        'desired', coalesce(NEW.desired_source, 'operator'), NEW.desired_generation);
END;
