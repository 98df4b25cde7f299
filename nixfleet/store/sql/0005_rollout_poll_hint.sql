-- 0005_rollout_poll_hint (shipped: append-only, never edited)
-- The short poll hint of a running rollout lives on the rollout, and the report
-- path looks it up through rollout_machines_machine: starting, pausing or
-- completing a rollout no longer rewrites a row of machines per target.
-- machines.poll_hint stays (append only) but is no longer read or written.
ALTER TABLE rollouts ADD COLUMN poll_hint INTEGER;
UPDATE rollouts SET poll_hint = (SELECT max(m.poll_hint) FROM rollout_machines rm
    JOIN machines m ON m.id = rm.machine_id WHERE rm.rollout_id = rollouts.id)
WHERE status = 'running';
