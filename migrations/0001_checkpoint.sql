-- pgds checkpoints: per replication slot, the highest commit LSN whose events are durable on
-- every stream they were routed to. pgds applies this at start-up; it is idempotent.
CREATE SCHEMA IF NOT EXISTS pgds;

CREATE TABLE IF NOT EXISTS pgds.checkpoints (
    slot       text PRIMARY KEY,
    lsn        pg_lsn NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
