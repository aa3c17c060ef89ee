-- pgds checkpoints: per replication slot, the highest commit LSN whose events are durable on
-- every stream they were routed to. pgds applies this at start-up; it is idempotent.
--
-- The schema is created only when missing: CREATE SCHEMA IF NOT EXISTS checks CREATE on the
-- database even when the schema exists, and a role given a prepared schema need not have it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'pgds') THEN
        CREATE SCHEMA pgds;
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS pgds.checkpoints (
    slot       text PRIMARY KEY,
    lsn        pg_lsn NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
