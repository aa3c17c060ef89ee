-- The demo's writes, made once pgds streams (scripts/demo; the demo-writes service of docker-compose.yml).
INSERT INTO todos (owner_id, title, internal_note) VALUES ('alice', 'Buy milk', 'private: never leaves the database');
INSERT INTO todos (owner_id, title) VALUES ('alice', 'Write the report');
INSERT INTO todos (owner_id, title) VALUES ('bob', 'Fix the bike');
INSERT INTO todos (owner_id, title) VALUES ('bob', 'Call the bank');
UPDATE todos SET done = true WHERE title = 'Buy milk';
UPDATE todos SET owner_id = 'bob' WHERE title = 'Write the report';   -- moves from alice to bob
DELETE FROM todos WHERE title = 'Fix the bike';
INSERT INTO announcements (message) VALUES ('Welcome to pgds!');         -- for every user
INSERT INTO documents (editors, body) VALUES (ARRAY['alice', 'bob'], 'Trip plan');  -- for its editors
