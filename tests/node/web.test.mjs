// The web demo (examples/web) in headless Chromium: Postgres (examples/demo.sql) → pgds
// (examples/demo.toml) → the Rust durable-streams-server → examples/web/server.mjs (page + proxy)
// → the page, which reads one user's stream with the official client. Rows of that user appear,
// change and disappear as SQL changes them; another user's never show; switching user reads
// only the new user's stream; a TRUNCATE (pgds re-sends the state after a `reset`) drops the
// stale rows, live and on a fresh read. Screenshots go to tests/node/artifacts/.
//
// Needs Chromium at /usr/bin/chromium (apt-get install -y chromium) or PGDS_CHROMIUM.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { ROOT, Stack, startPgds, startPostgres, startRustStreamsServer, startWebServer, waitFor } from './lib/harness.mjs';

const DB = 'demo';
const TIMEOUT_MS = 20_000;
const ARTIFACTS = path.join(ROOT, 'tests/node/artifacts');
const CHROMIUM = process.env.PGDS_CHROMIUM || '/usr/bin/chromium';

describe('the web demo in headless Chromium', () => {
  const stack = new Stack();
  let pg;
  let web;
  let pgds;
  let context;
  let page;
  let profile;
  const requests = []; // stream URLs the page requested, in order
  const pageErrors = [];
  const consoleLines = [];

  const sql = (text, params) => pg.query(DB, text, params);

  /** The todos SQL says `user` owns, as the page should list them. */
  async function todosOf(user) {
    const { rows } = await sql('SELECT id::text AS key, title, done FROM todos WHERE owner_id = $1 ORDER BY id', [user]);
    return rows;
  }

  /** The todos the page lists. */
  function shownTodos() {
    return page.$$eval('[data-testid=todo]', (items) =>
      items.map((li) => ({ key: li.dataset.key, title: li.querySelector('.title').textContent, done: li.dataset.done === 'true' })),
    );
  }

  /** Wait until the page lists exactly `user`'s todos (keys, titles, done), as SQL has them. */
  async function waitForTodosOf(user, what) {
    let expected;
    let shown;
    await waitFor(
      what ?? `the page to list exactly ${user}'s todos`,
      async () => {
        expected = await todosOf(user);
        shown = await shownTodos();
        return JSON.stringify(shown) === JSON.stringify(expected);
      },
      {
        timeout: TIMEOUT_MS,
        interval: 100,
        check: () => pgds.assertRunning(),
        describe: async () =>
          `page shows: ${JSON.stringify(shown)}\nSQL has:    ${JSON.stringify(expected)}\n` +
          `status: ${await page.textContent('#status')}\nbrowser console:\n${consoleLines.slice(-20).join('\n')}`,
      },
    );
    return shown;
  }

  before(async () => {
    await stack.guard(async () => {
      if (!fs.existsSync(CHROMIUM)) {
        throw new Error(`no Chromium at ${CHROMIUM}: apt-get install -y chromium (or set PGDS_CHROMIUM)`);
      }
      pg = stack.add('postgres', await startPostgres());
      await pg.createDb(DB);
      await pg.query(DB, fs.readFileSync(path.join(ROOT, 'examples/demo.sql'), 'utf8'));
      const streams = stack.add('streams server', await startRustStreamsServer());
      // The demo's own configuration, pointed at this cluster and this streams server.
      const configToml = fs.readFileSync(path.join(ROOT, 'examples/demo.toml'), 'utf8');
      const slot = /^slot\s*=\s*"([^"]+)"/m.exec(configToml)[1];
      pgds = stack.add(
        'pgds',
        await startPgds({
          configToml,
          slot,
          pg,
          db: DB,
          env: { PGDS__POSTGRES__URL: pg.url(DB), PGDS__STREAMS__BASE_URL: streams.baseUrl },
        }),
      );
      await sql(`
        INSERT INTO todos (owner_id, title, internal_note) VALUES ('alice', 'Buy milk', 'private');
        INSERT INTO todos (owner_id, title) VALUES ('alice', 'Write the report');
        INSERT INTO todos (owner_id, title) VALUES ('bob', 'Fix the bike');
        INSERT INTO todos (owner_id, title) VALUES ('bob', 'Call the bank');
        UPDATE todos SET done = true WHERE title = 'Buy milk';
        INSERT INTO announcements (message) VALUES ('Welcome to pgds!');
        INSERT INTO documents (editors, body) VALUES (ARRAY['alice', 'bob'], 'Trip plan');
      `);
      web = stack.add('web server', await startWebServer({ streamsUrl: streams.baseUrl }));

      profile = fs.mkdtempSync(path.join(os.tmpdir(), 'pgds-node-chromium-'));
      context = await chromium.launchPersistentContext(profile, {
        executablePath: CHROMIUM,
        headless: true,
        args: [
          '--headless',
          '--no-sandbox',
          '--disable-gpu',
          '--disable-quic',
          '--no-first-run',
          '--disable-background-networking',
          '--disable-component-update',
          '--disable-sync',
        ],
        viewport: { width: 1100, height: 720 },
      });
      page = context.pages()[0] ?? (await context.newPage());
      page.on('request', (req) => {
        const url = new URL(req.url());
        if (url.pathname.startsWith('/v1/stream/')) requests.push(url.pathname + url.search);
      });
      page.on('pageerror', (err) => pageErrors.push(err.stack ?? String(err)));
      page.on('console', (msg) => consoleLines.push(`[${msg.type()}] ${msg.text()}`));
      fs.mkdirSync(ARTIFACTS, { recursive: true });
    });
  });

  after(async () => {
    await context?.close().catch(() => {});
    if (profile) fs.rmSync(profile, { recursive: true, force: true });
    await stack.stop();
  });

  test('alice sees her todos, live, and none of bob’s', async () => {
    await stack.guard(async () => {
      await page.goto(`${web.url}/?user=alice`);
      await waitForTodosOf('alice');
      const shown = (await shownTodos()).map((t) => t.title);
      assert.deepStrictEqual(shown, ['Buy milk', 'Write the report']);
      await page.locator('#status[data-state=live]').waitFor({ timeout: TIMEOUT_MS });
      await page.locator('[data-testid=news]', { hasText: 'Welcome to pgds!' }).waitFor({ timeout: TIMEOUT_MS });
      await page.locator('[data-testid=document]', { hasText: 'Trip plan' }).waitFor({ timeout: TIMEOUT_MS });
      assert.equal(await page.locator('[data-testid=todo]', { hasText: /Fix the bike|Call the bank/ }).count(), 0);
      assert.equal(await page.locator('[data-testid=todo][data-done=true]', { hasText: 'Buy milk' }).count(), 1);

      // INSERT
      await sql(`INSERT INTO todos (owner_id, title) VALUES ('alice', 'Water the plants')`);
      await page.locator('[data-testid=todo]', { hasText: 'Water the plants' }).waitFor({ timeout: TIMEOUT_MS });
      // UPDATE
      await sql(`UPDATE todos SET done = true, title = 'Water the plants (twice)' WHERE title = 'Water the plants'`);
      await page.locator('[data-testid=todo][data-done=true]', { hasText: 'Water the plants (twice)' }).waitFor({ timeout: TIMEOUT_MS });
      // DELETE
      await sql(`DELETE FROM todos WHERE title = 'Write the report'`);
      await page.locator('[data-testid=todo]', { hasText: 'Write the report' }).waitFor({ state: 'detached', timeout: TIMEOUT_MS });
      // A row moving in from bob, and bob's own changes, which must not show here.
      await sql(`UPDATE todos SET owner_id = 'alice' WHERE title = 'Call the bank'`);
      await sql(`INSERT INTO todos (owner_id, title) VALUES ('bob', 'Bob only')`);
      await sql(`INSERT INTO todos (owner_id, title) VALUES ('alice', 'Plan the trip')`);
      await waitForTodosOf('alice');
      assert.deepStrictEqual(
        (await shownTodos()).map((t) => t.title),
        ['Buy milk', 'Call the bank', 'Water the plants (twice)', 'Plan the trip'],
      );
      assert.equal(await page.locator('[data-testid=todo]', { hasText: /Fix the bike|Bob only/ }).count(), 0);
      assert.ok(
        requests.every((r) => r.startsWith('/v1/stream/user/alice/data?')),
        `alice's page read only alice's stream: ${JSON.stringify(requests)}`,
      );
      assert.ok(requests.some((r) => /[?&]live=sse/.test(r)), `the page reads live over SSE: ${JSON.stringify(requests)}`);
      assert.ok(!consoleLines.some((l) => /Falling back to long polling/.test(l)), 'SSE did not fall back to long-polling');
      await page.screenshot({ path: path.join(ARTIFACTS, 'web-alice.png') });
    });
  });

  test('switching to bob shows only bob’s todos, from bob’s stream only', async () => {
    await stack.guard(async () => {
      const before = requests.length;
      await page.getByTestId('user-bob').click();
      await page.waitForURL(/\?user=bob$/, { timeout: TIMEOUT_MS });
      await waitForTodosOf('bob');
      assert.deepStrictEqual((await shownTodos()).map((t) => t.title), ['Fix the bike', 'Bob only']);
      await page.locator('#status[data-state=live]').waitFor({ timeout: TIMEOUT_MS });

      // Live for bob; alice's changes do not show.
      await sql(`INSERT INTO todos (owner_id, title) VALUES ('alice', 'Alice again')`);
      await sql(`UPDATE todos SET done = true WHERE title = 'Fix the bike'`);
      await page.locator('[data-testid=todo][data-done=true]', { hasText: 'Fix the bike' }).waitFor({ timeout: TIMEOUT_MS });
      await waitForTodosOf('bob');
      assert.equal(await page.locator('[data-testid=todo]', { hasText: /Alice again|Buy milk|Call the bank|Water the plants/ }).count(), 0);

      const after = requests.slice(before);
      assert.ok(after.length > 0, 'the page requested bob’s stream');
      assert.ok(
        after.every((r) => r.startsWith('/v1/stream/user/bob/data?')),
        `after the switch the page read only bob's stream: ${JSON.stringify(after)}`,
      );
      await page.screenshot({ path: path.join(ARTIFACTS, 'web-bob.png') });
      assert.deepStrictEqual(pageErrors, [], 'no uncaught errors in the page');
    });
  });

  test('a TRUNCATE resets the page: stale rows go, the state comes again', async () => {
    await stack.guard(async () => {
      // The page is bob's, live, with rows that the TRUNCATE makes stale.
      assert.match(page.url(), /\?user=bob$/);
      assert.ok((await waitForTodosOf('bob')).length >= 2);
      await sql(`
        BEGIN;
        TRUNCATE todos;
        INSERT INTO todos (owner_id, title) VALUES ('bob', 'After the truncate');
        COMMIT;
      `);
      // pgds re-sends bob's state after a reset: only the row written after the TRUNCATE, and
      // the rows of the other tables (the document, the announcement) again.
      await waitForTodosOf('bob', 'the page to drop the truncated todos and list the new one');
      assert.deepStrictEqual((await shownTodos()).map((t) => t.title), ['After the truncate']);
      await page.locator('[data-testid=document]', { hasText: 'Trip plan' }).waitFor({ timeout: TIMEOUT_MS });
      await page.locator('[data-testid=news]', { hasText: 'Welcome to pgds!' }).waitFor({ timeout: TIMEOUT_MS });
      const res = await fetch(`${web.url}/v1/stream/user/bob/data?offset=-1`);
      const events = await res.json();
      const reset = events.findIndex((e) => e?.headers?.control === 'reset');
      assert.ok(reset > 0, 'bob\'s stream holds a reset after its first rows');
      assert.equal(events[reset + 1]?.headers?.control, 'snapshot-start', 'the state follows the reset');
      await page.screenshot({ path: path.join(ARTIFACTS, 'web-bob-truncated.png') });

      // Read from the beginning, through the reset: alice's truncated todos do not come back.
      await page.getByTestId('user-alice').click();
      await page.waitForURL(/\?user=alice$/, { timeout: TIMEOUT_MS });
      await page.locator('#status[data-state=live]').waitFor({ timeout: TIMEOUT_MS });
      await waitForTodosOf('alice', 'alice’s page to list no todo after the TRUNCATE');
      assert.equal(await page.locator('[data-testid=todo]').count(), 0);
      assert.ok(await page.locator('#todos-empty').isVisible(), 'the empty list says so');
      await page.locator('[data-testid=document]', { hasText: 'Trip plan' }).waitFor({ timeout: TIMEOUT_MS });
      assert.deepStrictEqual(pageErrors, [], 'no uncaught errors in the page');
    });
  });

  test('the proxy passes SSE through unbuffered', async () => {
    await stack.guard(async () => {
      // Open an SSE read at the tail of alice's stream through server.mjs, then write: the event
      // must arrive on the still-open response (a buffering proxy would hold it back).
      const controller = new AbortController();
      const res = await fetch(`${web.url}/v1/stream/user/alice/data?offset=now&live=sse`, { signal: controller.signal });
      try {
        assert.equal(res.status, 200);
        assert.match(res.headers.get('content-type') ?? '', /text\/event-stream/);
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let text = '';
        await sql(`INSERT INTO todos (owner_id, title) VALUES ('alice', 'Through the proxy')`);
        const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
        try {
          while (!text.includes('Through the proxy')) {
            const { value, done } = await reader.read();
            if (done) throw new Error('the SSE response ended');
            text += decoder.decode(value, { stream: true });
          }
        } catch (err) {
          throw new Error(`no SSE event through the proxy within ${TIMEOUT_MS} ms (${err.message}); received:\n${text}`);
        } finally {
          clearTimeout(timer);
        }
      } finally {
        controller.abort();
      }
      // Writes are refused: only pgds appends.
      const post = await fetch(`${web.url}/v1/stream/user/alice/data`, { method: 'POST', body: '[]' });
      assert.equal(post.status, 405);
    });
  });
});
