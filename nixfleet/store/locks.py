"""PostgreSQL's advisory-lock keys, in one place.

Advisory locks are per database and keyed by a bare number: two nouns that chose the
same key would wait for each other, so every key the store takes is defined here
(tests/store/test_pg_schema.py holds them distinct, and CHANGES to the literal in
0004_baseline.sql's cache_change). All share the prefix 0x6E66 ("nf").
"""

from __future__ import annotations

MIGRATION = 0x6E66_0001  # store.pg.migrate: one replica applies a migration at a time
LEADER = 0x6E66_0002  # store.leader: the session lock of the replica that runs the jobs
CHANGES = 0x6E66_0003  # cache_change(): change numbers commit in their order
LEASES = 0x6E66_0010  # store.leases.take: a group's leases counted, then one taken
WEBHOOK_STALE = 0x6E66_0011  # store.webhooks.detect_stale: one silence announced once
ROLLOUT_APPLY = 0x6E66_0020  # store.rollouts.apply: its checks, then the new rollout

ALL = {
    "MIGRATION": MIGRATION,
    "LEADER": LEADER,
    "CHANGES": CHANGES,
    "LEASES": LEASES,
    "WEBHOOK_STALE": WEBHOOK_STALE,
    "ROLLOUT_APPLY": ROLLOUT_APPLY,
}
