-- 0008_fixed_width_times (shipped: append-only, never edited)
-- Times were stored by an isoformat that dropped a zero fraction ("…:00Z", 20
-- characters, which sorts after "…:00.5Z"), so SQL padded them before comparing.
-- Now every time is models.TIME_FORMAT, 27 characters, and compares as stored.
UPDATE machines SET registered_at = substr(registered_at, 1, 19) || '.000000Z' WHERE length(registered_at) = 20;
UPDATE machines SET desired_set_at = substr(desired_set_at, 1, 19) || '.000000Z' WHERE length(desired_set_at) = 20;
UPDATE machines SET last_report_at = substr(last_report_at, 1, 19) || '.000000Z' WHERE length(last_report_at) = 20;
UPDATE machines SET retry_requested_at = substr(retry_requested_at, 1, 19) || '.000000Z' WHERE length(retry_requested_at) = 20;
UPDATE reports SET received_at = substr(received_at, 1, 19) || '.000000Z' WHERE length(received_at) = 20;
UPDATE api_keys SET created_at = substr(created_at, 1, 19) || '.000000Z' WHERE length(created_at) = 20;
UPDATE api_keys SET revoked_at = substr(revoked_at, 1, 19) || '.000000Z' WHERE length(revoked_at) = 20;
UPDATE machine_tokens SET created_at = substr(created_at, 1, 19) || '.000000Z' WHERE length(created_at) = 20;
UPDATE audit SET at = substr(at, 1, 19) || '.000000Z' WHERE length(at) = 20;
UPDATE enroll_tokens SET created_at = substr(created_at, 1, 19) || '.000000Z' WHERE length(created_at) = 20;
UPDATE enroll_tokens SET expires_at = substr(expires_at, 1, 19) || '.000000Z' WHERE length(expires_at) = 20;
UPDATE enroll_tokens SET revoked_at = substr(revoked_at, 1, 19) || '.000000Z' WHERE length(revoked_at) = 20;
UPDATE enroll_tokens SET last_used_at = substr(last_used_at, 1, 19) || '.000000Z' WHERE length(last_used_at) = 20;
UPDATE releases SET created_at = substr(created_at, 1, 19) || '.000000Z' WHERE length(created_at) = 20;
UPDATE rollouts SET created_at = substr(created_at, 1, 19) || '.000000Z' WHERE length(created_at) = 20;
UPDATE rollouts SET updated_at = substr(updated_at, 1, 19) || '.000000Z' WHERE length(updated_at) = 20;
UPDATE rollout_batches SET started_at = substr(started_at, 1, 19) || '.000000Z' WHERE length(started_at) = 20;
UPDATE rollout_batches SET finished_at = substr(finished_at, 1, 19) || '.000000Z' WHERE length(finished_at) = 20;
UPDATE rollout_machines SET healthy_since = substr(healthy_since, 1, 19) || '.000000Z' WHERE length(healthy_since) = 20;
UPDATE rollout_machines SET decided_at = substr(decided_at, 1, 19) || '.000000Z' WHERE length(decided_at) = 20;
UPDATE rollout_events SET at = substr(at, 1, 19) || '.000000Z' WHERE length(at) = 20;
UPDATE rollout_files SET checked_at = substr(checked_at, 1, 19) || '.000000Z' WHERE length(checked_at) = 20;
