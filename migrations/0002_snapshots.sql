-- pgds initial snapshots: per replication slot, the consistent point of the slot pgds created
-- with an exported snapshot, and how many times the copy was started. The copy is complete
-- once the slot's checkpoint (pgds.checkpoints) reaches the consistent point.
CREATE TABLE IF NOT EXISTS pgds.snapshots (
    slot             text PRIMARY KEY,
    consistent_point pg_lsn NOT NULL,
    attempt          integer NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now()
);
