-- 0006_bounded_ticks (shipped: append-only, never edited)
-- A tick writes at most a bounded number of machines (reconciler.TICK_MACHINES):
-- a large batch gets its desired generations over several ticks (started_until,
-- the last position written) and is judged a window of positions per tick
-- (judged_until, where the next window starts; NULL: from the batch's start),
-- and a revert restores a chunk of positions per tick (rollouts.revert_after,
-- NULL when no revert is under way). Positions of one batch are contiguous
-- (store.rollouts.apply). Batches that started before this migration were
-- written whole.
ALTER TABLE rollouts ADD COLUMN revert_after INTEGER;
ALTER TABLE rollout_batches ADD COLUMN started_until INTEGER;
ALTER TABLE rollout_batches ADD COLUMN judged_until INTEGER;
UPDATE rollout_batches SET started_until = (SELECT max(rm.position)
    FROM rollout_machines rm WHERE rm.rollout_id = rollout_batches.rollout_id
    AND rm.batch_idx = rollout_batches.idx)
WHERE started_at IS NOT NULL;
