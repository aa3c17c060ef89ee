-- Which users' streams received rows of which table, per slot: a TRUNCATE of the table
-- re-emits the state of exactly those users (a `reset`, then their rows of every table).
CREATE TABLE IF NOT EXISTS pgds.stream_tables (
    slot       text NOT NULL,
    table_name text NOT NULL,
    user_id    text NOT NULL,
    PRIMARY KEY (slot, table_name, user_id)
);
