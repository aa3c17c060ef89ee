-- The demo schema (scripts/demo, docker-compose.yml): an app with users, their todos, documents
-- shared by their editors and announcements for everyone. Routing by a column needs the old row
-- on UPDATE and DELETE, hence REPLICA IDENTITY FULL.

CREATE TABLE users (
    id   text PRIMARY KEY,
    name text
);

CREATE TABLE todos (
    id            bigserial PRIMARY KEY,
    owner_id      text NOT NULL REFERENCES users,
    title         text,
    done          bool DEFAULT false,
    internal_note text                      -- excluded: never leaves the database
);

CREATE TABLE documents (
    id      bigserial PRIMARY KEY,
    editors text[] NOT NULL,                -- every editor receives the document
    body    text
);

CREATE TABLE announcements (
    id      serial PRIMARY KEY,
    message text                            -- shared with every user
);

ALTER TABLE users REPLICA IDENTITY FULL;
ALTER TABLE todos REPLICA IDENTITY FULL;
ALTER TABLE documents REPLICA IDENTITY FULL;
ALTER TABLE announcements REPLICA IDENTITY FULL;

INSERT INTO users (id, name) VALUES ('alice', 'Alice'), ('bob', 'Bob');
