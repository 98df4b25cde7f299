-- 0002_leadership: the replicas' fencing epoch (docs/scaling.md "Several replicas").
-- A replica that takes the leader's advisory lock increments `epoch`; every
-- background transaction first reads it FOR SHARE and aborts when it is not its own.
CREATE TABLE leadership (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL CHECK (epoch >= 0),
    holder TEXT COLLATE "C",
    acquired_at TEXT COLLATE "C"
);
INSERT INTO leadership (id, epoch) VALUES (1, 0);
