-- pgds frozen copies: the rows of an initial copy, frozen at the slot's exported snapshot into
-- unlogged tables of schema pgds before anything is appended, so that a copy interrupted by a
-- crash is replayed identically and the streams server refuses, by Stream-Seq, the parts it
-- already holds. Dropped once the copy is complete.
CREATE SEQUENCE IF NOT EXISTS pgds.copy_ids;
CREATE TABLE IF NOT EXISTS pgds.frozen (
    slot        text PRIMARY KEY,
    -- [{"table": "public.t", "frozen": "copy_12", "rows": 100}, ...] in copy order, and the
    -- users of [users] (for routes to every user) the same way under "users".
    tables      jsonb NOT NULL,
    -- What decides the copy's parts (tables, rules, batch sizes, stream paths): a restart with
    -- another one cannot replay the copy identically.
    fingerprint text NOT NULL,
    copied_at   timestamptz NOT NULL
);
