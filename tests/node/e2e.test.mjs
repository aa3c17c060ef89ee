// End to end with the official JavaScript packages: Postgres → pgds → a Durable Streams server →
// @durable-streams/client + @durable-streams/state, against two independent server
// implementations (the Rust binary pgds's own tests use, and the Node reference server).
//
// For each sink: a mixed workload for three users (inserts, updates, owner changes, primary key
// changes, deletes, a rolled-back transaction, shared rows for everyone), each user's stream read
// live with `stream()` + `subscribeJson()` and materialized with `MaterializedState` until it
// equals what SQL says that user may see, key by key and value by value; then a reader stopped
// midway resumes from its saved offset and must receive exactly the later messages.
//
// Run with tests/node/run (PGDS_BIN selects the pgds binary; default target/debug/pgds).
// SEED=n replays a workload.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { isDeepStrictEqual } from 'node:util';
import { Stack, startPgds, startPostgres, startNodeStreamsServer, startRustStreamsServer, waitFor } from './lib/harness.mjs';
import { Reader, compareKeys, readAll, snapshot } from './lib/reader.mjs';

const USERS = ['alice', 'bob', 'carol'];
const DB = 'app';
const SLOT = 'pgds_node';
const CONVERGE_MS = 30_000;

const SCHEMA = `
CREATE TABLE users (
    id   text PRIMARY KEY,
    name text
);
CREATE TABLE todos (
    id            bigserial PRIMARY KEY,
    owner_id      text NOT NULL REFERENCES users,
    title         text NOT NULL,
    done          bool NOT NULL DEFAULT false,
    priority      int4,
    tags          text[],
    meta          jsonb,
    internal_note text                     -- excluded: must never reach a stream
);
CREATE TABLE announcements (               -- shared: every user receives it
    id      serial PRIMARY KEY,
    message text NOT NULL,
    pinned  bool NOT NULL DEFAULT false
);
ALTER TABLE users REPLICA IDENTITY FULL;
ALTER TABLE todos REPLICA IDENTITY FULL;
`;

function config(pgUrl, streamsUrl) {
  return `
[postgres]
url = "${pgUrl}"
slot = "${SLOT}"
publication = "${SLOT}"

[streams]
base_url = "${streamsUrl}"
path = "/v1/stream/user/{user_id}/data"

[batch]
linger_ms = 5

[users]
table = "public.users"
column = "id"

[[tables]]
name = "public.todos"
route = { column = "owner_id" }
exclude_columns = ["internal_note"]

[[tables]]
name = "public.announcements"
alias = "news"
route = { all = true }

[[tables]]
name = "public.users"
route = { column = "id" }          # each user sees their own user row
`;
}

/** What `user` may see, as SQL says: `{type: {key: value}}`, in pgds's JSON shapes. */
async function expectedState(pg, user) {
  const q = async (sql, params) => (await pg.query(DB, sql, params)).rows;
  const out = {};
  const put = (type, rows) => {
    if (rows.length === 0) return;
    rows.sort((a, b) => compareKeys(a.key, b.key));
    out[type] = Object.fromEntries(rows.map((r) => [r.key, r.value]));
  };
  // to_jsonb maps these column types exactly as pgds does (bigint ids are small numbers).
  put('todos', await q(`SELECT id::text AS key, to_jsonb(t) - 'internal_note' AS value FROM todos t WHERE owner_id = $1`, [user]));
  put('news', await q(`SELECT id::text AS key, to_jsonb(a) AS value FROM announcements a`));
  put('users', await q(`SELECT id AS key, to_jsonb(u) AS value FROM users u WHERE id = $1`, [user]));
  return out;
}

// ---- a deterministic workload ----

function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

class Workload {
  constructor(client, seed) {
    this.c = client;
    this.rand = prng(seed);
    this.n = 0;
  }

  pick(list) {
    return list[Math.floor(this.rand() * list.length)];
  }

  async tx(fn) {
    await this.c.query('BEGIN');
    try {
      await fn();
      await this.c.query('COMMIT');
    } catch (e) {
      await this.c.query('ROLLBACK').catch(() => {});
      throw e;
    }
  }

  async insertTodo(owner, title = `todo ${++this.n}`) {
    const r = await this.c.query(
      `INSERT INTO todos (owner_id, title, priority, tags, meta, internal_note)
       VALUES ($1, $2, $3, $4, $5, $6) RETURNING id`,
      [owner, title, Math.floor(this.rand() * 5), [this.pick(['home', 'work']), `t${this.n}`], { n: this.n, nested: { ok: true } }, `secret ${this.n}`],
    );
    return r.rows[0].id;
  }

  async todoIds() {
    return (await this.c.query('SELECT id FROM todos ORDER BY id')).rows.map((r) => r.id);
  }

  /** One transaction of 1–4 random operations on random todos. */
  async randomTx() {
    await this.tx(async () => {
      const ops = 1 + Math.floor(this.rand() * 4);
      for (let i = 0; i < ops; i++) {
        const ids = await this.todoIds();
        const id = ids.length ? this.pick(ids) : null;
        const r = this.rand();
        if (r < 0.3 || id === null) {
          await this.insertTodo(this.pick(USERS));
        } else if (r < 0.55) {
          await this.c.query(`UPDATE todos SET done = NOT done, title = title || '.', internal_note = 'changed' WHERE id = $1`, [id]);
        } else if (r < 0.75) {
          await this.c.query(`UPDATE todos SET owner_id = $2, priority = coalesce(priority, 0) + 1 WHERE id = $1`, [id, this.pick(USERS)]);
        } else if (r < 0.85) {
          await this.c.query(`UPDATE todos SET meta = jsonb_set(coalesce(meta, '{}'), '{moved}', 'true'), tags = NULL WHERE id = $1`, [id]);
        } else {
          await this.c.query(`DELETE FROM todos WHERE id = $1`, [id]);
        }
      }
    });
  }

  /** Users, shared rows, todos, then every kind of change, in ~25 transactions. */
  async phase1() {
    await this.tx(async () => {
      for (const u of USERS) await this.c.query(`INSERT INTO users (id, name) VALUES ($1, $2)`, [u, u.toUpperCase()]);
    });
    await this.c.query(`INSERT INTO announcements (message) VALUES ('welcome'), ('maintenance on friday')`);
    for (let i = 0; i < 8; i++) {
      await this.tx(async () => {
        const k = 1 + Math.floor(this.rand() * 3);
        for (let j = 0; j < k; j++) await this.insertTodo(this.pick(USERS));
      });
    }
    for (const u of USERS) await this.insertTodo(u, `${u}'s first`); // each user has at least one
    // Owner changes in both directions, in one transaction.
    await this.tx(async () => {
      await this.c.query(`UPDATE todos SET owner_id = 'bob' WHERE title = 'alice''s first'`);
      await this.c.query(`UPDATE todos SET owner_id = 'alice' WHERE title = 'carol''s first'`);
      await this.insertTodo('carol', 'carol again');
    });
    // A row that lives and dies inside one transaction: nobody may end up with it.
    await this.tx(async () => {
      const id = await this.insertTodo('alice', 'ephemeral');
      await this.c.query(`UPDATE todos SET owner_id = 'bob', title = 'ephemeral 2' WHERE id = $1`, [id]);
      await this.c.query(`DELETE FROM todos WHERE id = $1`, [id]);
    });
    // A primary key change (delete of the old key, insert of the new one).
    const [first] = await this.todoIds();
    await this.c.query(`UPDATE todos SET id = id + 1000 WHERE id = $1`, [first]);
    // A rolled-back transaction: nothing of it may appear.
    await this.c.query('BEGIN');
    await this.insertTodo('alice', 'rolled back');
    await this.c.query(`UPDATE announcements SET message = 'rolled back'`);
    await this.c.query('ROLLBACK');
    // Shared rows change too.
    await this.tx(async () => {
      await this.c.query(`UPDATE announcements SET pinned = true WHERE message = 'welcome'`);
      await this.c.query(`DELETE FROM announcements WHERE message = 'maintenance on friday'`);
      await this.c.query(`INSERT INTO announcements (message) VALUES ('new release')`);
    });
    await this.c.query(`UPDATE users SET name = 'Alice A.' WHERE id = 'alice'`);
    for (let i = 0; i < 10; i++) await this.randomTx();
  }
}

// ---- per-stream checks ----

function lsnValue(lsn) {
  const [hi, lo] = lsn.split('/');
  return (BigInt(`0x${hi}`) << 32n) | BigInt(`0x${lo}`);
}

/** Every message is a well-formed change event, in commit order, without excluded columns. */
function checkMessages(user, items) {
  let last = -1n;
  for (const [i, m] of items.entries()) {
    const where = `${user}'s message #${i} ${JSON.stringify(m)}`;
    assert.equal(typeof m.type, 'string', where);
    assert.ok(m.type.length > 0, where);
    assert.equal(typeof m.key, 'string', where);
    assert.ok(m.key.length > 0, where);
    assert.ok(['insert', 'update', 'delete'].includes(m.headers?.operation), where);
    assert.match(m.headers.txid, /^\d+$/, where);
    assert.match(m.headers.lsn, /^[0-9A-F]+\/[0-9A-F]+$/, where);
    assert.ok(!Number.isNaN(Date.parse(m.headers.timestamp)), where);
    if (m.headers.operation === 'delete') assert.equal(m.value, undefined, where);
    else assert.equal(typeof m.value, 'object', where);
    if (m.type === 'todos' && m.value) {
      assert.ok(!('internal_note' in m.value), `excluded column leaked: ${where}`);
      assert.equal(m.value.owner_id, user, `another user's row: ${where}`);
      assert.ok(!m.value.title.includes('rolled back'), `rolled-back row: ${where}`);
    }
    const lsn = lsnValue(m.headers.lsn);
    assert.ok(lsn >= last, `out of commit order: ${where}`);
    last = lsn;
  }
}

// ---- the scenario, once per sink ----

// PGDS_E2E_SINKS=rust or =node runs one of them only.
const SINKS = [
  { id: 'rust', name: 'the Rust durable-streams-server', start: startRustStreamsServer },
  { id: 'node', name: 'the Node reference server (@durable-streams/server)', start: startNodeStreamsServer },
].filter((s) => !process.env.PGDS_E2E_SINKS || process.env.PGDS_E2E_SINKS.split(',').includes(s.id));

const seed = Number(process.env.SEED ?? Math.floor(Math.random() * 2 ** 31));
console.log(`e2e workload seed: ${seed} (replay with SEED=${seed})`);

for (const sink of SINKS) {
  describe(`pgds → ${sink.name} → official JS client`, () => {
    const stack = new Stack();
    let pg;
    let sinkServer;
    let pgds;
    let writer;
    let work;
    const streamUrl = (user) => `${sinkServer.baseUrl}/v1/stream/user/${encodeURIComponent(user)}/data`;
    const readers = {}; // user → Reader from -1 (stopped midway)
    const resumed = {}; // user → Reader from the saved offset

    /** Wait until each reader's state equals SQL for its user; fail fast if pgds or a reader fails. */
    async function converge(readersByUser, what) {
      const last = {};
      await waitFor(
        what,
        async () => {
          for (const user of USERS) {
            const expected = await expectedState(pg, user);
            const actual = snapshot(readersByUser[user].state);
            last[user] = { expected, actual };
            if (!isDeepStrictEqual(actual, expected)) return false;
          }
          return true;
        },
        {
          timeout: CONVERGE_MS,
          interval: 100,
          check: () => {
            pgds.assertRunning();
            for (const user of USERS) readersByUser[user].assertHealthy();
          },
          describe: () => {
            for (const user of USERS) {
              if (last[user] && !isDeepStrictEqual(last[user].actual, last[user].expected)) {
                try {
                  assert.deepStrictEqual(last[user].actual, last[user].expected);
                } catch (e) {
                  return `${user}'s materialized state differs from SQL:\n${e.message}`;
                }
              }
            }
            return '';
          },
        },
      );
      // Key by key and value by value (the same comparison, with assert's diff on failure).
      for (const user of USERS) {
        assert.deepStrictEqual(snapshot(readersByUser[user].state), await expectedState(pg, user), `${user}: state vs SQL`);
      }
    }

    before(async () => {
      await stack.guard(async () => {
        pg = stack.add('postgres', await startPostgres());
        await pg.createDb(DB);
        await pg.query(DB, SCHEMA);
        sinkServer = stack.add('streams server', await sink.start());
        pgds = stack.add('pgds', await startPgds({ configToml: config(pg.url(DB), sinkServer.baseUrl), slot: SLOT, pg, db: DB }));
        writer = await pg.client(DB);
        work = new Workload(writer, seed);
      });
    });

    after(async () => {
      for (const r of [...Object.values(readers), ...Object.values(resumed)]) r.stop();
      await writer?.end().catch(() => {});
      await stack.stop();
    });

    test('a mixed workload for three users materializes to exactly what SQL shows each of them', async () => {
      await stack.guard(async () => {
        await work.phase1();
        for (const user of USERS) readers[user] = await new Reader(streamUrl(user), { offset: '-1', live: true }).start();
        await converge(readers, 'every user’s live materialized state to equal SQL');
        for (const user of USERS) checkMessages(user, readers[user].items);
      });
    });

    test('a reader stopped midway resumes from its saved offset: no gap, no duplicate', async () => {
      await stack.guard(async () => {
        assert.ok(Object.keys(readers).length === USERS.length, 'the first test set up the readers');
        // While the first readers are still live, write a transaction that reaches everyone and
        // stop each reader right after the batch that carries it: its saved offset lies midway
        // through the writes that follow, some of which may already be in the stream.
        for (const user of USERS) {
          readers[user].stopWhen = (batch) => batch.items.some((m) => m.type === 'todos' && m.value?.title === 'midway');
        }
        await work.tx(async () => {
          for (const user of USERS) await work.insertTodo(user, 'midway');
        });
        for (let i = 0; i < 4; i++) await work.randomTx();
        await waitFor('every reader to stop at the “midway” batch', () => USERS.every((u) => readers[u].stopped), {
          timeout: CONVERGE_MS,
          check: () => pgds.assertRunning(),
        });
        for (let i = 0; i < 8; i++) await work.randomTx();
        await work.tx(async () => {
          for (const user of USERS) await work.insertTodo(user, 'after the resume');
        });

        // New sessions from the saved offsets, continuing the same materialized states.
        const saved = {};
        for (const user of USERS) {
          saved[user] = { offset: readers[user].offset, count: readers[user].items.length };
          resumed[user] = await new Reader(streamUrl(user), { offset: saved[user].offset, live: true, state: readers[user].state }).start();
        }
        await converge(resumed, 'the resumed readers’ state to equal SQL');

        for (const user of USERS) {
          const before = readers[user].items;
          const later = resumed[user].items;
          assert.equal(readers[user].items.length, saved[user].count, `${user}: the stopped reader took nothing after stopping`);
          assert.ok(later.length > 0, `${user}: the resumed reader received the later messages`);
          assert.ok(
            lsnValue(later[0].headers.lsn) >= lsnValue(before.at(-1).headers.lsn),
            `${user}: the resumed reader starts after what was read (${before.at(-1).headers.lsn} → ${later[0].headers.lsn})`,
          );
          // Exactly the stream, split at the saved offset: a catch-up read of the whole stream
          // equals what the first reader consumed followed by what the resumed reader consumed.
          const whole = await readAll(streamUrl(user));
          const brief = (m) => `${m.headers.lsn} ${m.headers.operation} ${m.type}/${m.key}`;
          const context =
            `saved offset ${saved[user].offset}; the first reader's last batches ${JSON.stringify(readers[user].batchLog.slice(-3))}\n` +
            `first reader's last: ${before.slice(-4).map(brief).join(' | ')}\n` +
            `resumed reader's first: ${later.slice(0, 4).map(brief).join(' | ')} (batches ${JSON.stringify(resumed[user].batchLog.slice(0, 3))})\n` +
            `the whole stream around there: ${whole.slice(Math.max(0, before.length - 4), before.length + 4).map(brief).join(' | ')}`;
          assert.equal(before.length + later.length, whole.length, `${user}: message count (before ${before.length} + after ${later.length})\n${context}`);
          assert.deepStrictEqual([...before, ...later], whole, `${user}: messages before and after the resume point\n${context}`);
          // And a catch-up read from the saved offset gives the same later messages.
          assert.deepStrictEqual(await readAll(streamUrl(user), saved[user].offset), later, `${user}: catch-up from the saved offset`);
          checkMessages(user, whole);
        }
      });
    });

    test('an SSE reader from the beginning converges to the same state', async () => {
      await stack.guard(async () => {
        const sse = {};
        try {
          for (const user of USERS) sse[user] = await new Reader(streamUrl(user), { offset: '-1', live: 'sse' }).start();
          await work.randomTx();
          await converge(sse, 'every SSE reader’s state to equal SQL');
        } finally {
          for (const r of Object.values(sse)) r.stop();
        }
      });
    });

    test('pgds shuts down gracefully on SIGTERM (exit code 0)', async () => {
      await stack.guard(async () => {
        const status = await pgds.stop();
        assert.deepStrictEqual({ code: status.code, signal: status.signal }, { code: 0, signal: null }, `pgds exit: ${JSON.stringify(status)}`);
      });
    });
  });
}
