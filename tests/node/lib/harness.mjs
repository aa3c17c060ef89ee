// Throw-away components for the Node end-to-end tests, mirroring tests/support/ (Rust):
// a PostgreSQL cluster (initdb + postgres on a free loopback port, wal_level=logical, run as the
// `postgres` user when we are root), a Durable Streams server (the official Rust binary, or the
// Node reference server in-process), pgds itself, and the web demo's server (examples/web).
//
// Every process started here is registered and killed when the test process exits, whatever
// the reason (failed assertion, uncaught error, SIGINT/SIGTERM from the test runner); the
// `after` hooks of the tests stop them gracefully first.

import { spawn, spawnSync, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

const START_TIMEOUT_MS = 60_000;
const PORT_ATTEMPTS = 5;

// ---------------------------------------------------------------------------------------------
// Clean-up on exit

/** Synchronous kill functions of everything still running, run on process exit. */
const running = new Set();
/** Temp dirs to remove on process exit. */
const tempDirs = new Set();

process.on('exit', () => {
  for (const kill of running) {
    try {
      kill();
    } catch {
      // best effort
    }
  }
  for (const dir of tempDirs) {
    try {
      fs.rmSync(dir, { recursive: true, force: true });
    } catch {
      // best effort
    }
  }
});
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(sig, () => process.exit(130));
}

function tempDir(prefix) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

function removeDir(dir) {
  fs.rmSync(dir, { recursive: true, force: true });
  tempDirs.delete(dir);
}

// ---------------------------------------------------------------------------------------------
// Small utilities

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A free TCP port on 127.0.0.1 (it may be taken again before use: callers retry). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function canConnect(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    const done = (ok) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(500, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

/** The last `n` lines of a text file ('' when it does not exist). */
export function tail(file, n = 40) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return '';
  }
  return text.split('\n').slice(-n - 1).join('\n');
}

/**
 * Poll `probe` (sync or async) every `interval` ms until it returns a truthy value, which is
 * returned. After `timeout` ms, throw an error built from `describe()` (the last probe error or
 * state). `check()` runs before each probe and may throw to fail early (e.g. pgds exited).
 */
export async function waitFor(what, probe, { timeout = 30_000, interval = 50, check, describe } = {}) {
  const deadline = Date.now() + timeout;
  let lastError;
  for (;;) {
    if (check) await check();
    try {
      const value = await probe();
      if (value) return value;
      lastError = undefined;
    } catch (e) {
      lastError = e;
    }
    if (Date.now() >= deadline) {
      let detail = '';
      if (describe) {
        try {
          detail = await describe();
        } catch (e) {
          detail = `(describe failed: ${e.message})`;
        }
      }
      const err = new Error(
        `timed out after ${timeout} ms waiting for ${what}` +
          (lastError ? `; last error: ${lastError.stack ?? lastError}` : '') +
          (detail ? `\n${detail}` : ''),
      );
      if (lastError) err.cause = lastError;
      throw err;
    }
    await sleep(interval);
  }
}

/** Spawn a long-running process with stdout+stderr appended to `log`; registered for clean-up. */
function spawnLogged(cmd, args, { log, env, cwd, uid, gid }) {
  const fd = fs.openSync(log, 'a');
  const child = spawn(cmd, args, { stdio: ['ignore', fd, fd], env, cwd, uid, gid });
  fs.closeSync(fd);
  const kill = () => child.kill('SIGKILL');
  running.add(kill);
  child.exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => {
      running.delete(kill);
      child.exitStatus = { code, signal };
      resolve(child.exitStatus);
    });
    child.once('error', (err) => {
      running.delete(kill);
      child.exitStatus = { code: null, signal: null, error: err };
      resolve(child.exitStatus);
    });
  });
  return child;
}

/** Signal a child and wait up to `ms` for it to exit; SIGKILL it after that. */
async function stopChild(child, signal, ms) {
  if (!child || child.exitStatus) return child?.exitStatus;
  child.kill(signal);
  let timer;
  const timeout = new Promise((resolve) => {
    timer = setTimeout(() => resolve('timeout'), ms);
  });
  const outcome = await Promise.race([child.exited, timeout]);
  clearTimeout(timer);
  if (outcome === 'timeout') {
    child.kill('SIGKILL');
    await child.exited;
  }
  return child.exitStatus;
}

const describeExit = (s) =>
  s.error ? `failed to start: ${s.error.message}` : s.signal ? `killed by ${s.signal}` : `exit code ${s.code}`;

// ---------------------------------------------------------------------------------------------
// PostgreSQL

function pgBindir() {
  const candidates = [];
  if (process.env.PGDS_PG_BINDIR) candidates.push(process.env.PGDS_PG_BINDIR);
  try {
    candidates.push(execFileSync('pg_config', ['--bindir'], { encoding: 'utf8' }).trim());
  } catch {
    // no pg_config
  }
  candidates.push('/usr/lib/postgresql/15/bin');
  const dir = candidates.find((d) => fs.existsSync(path.join(d, 'postgres')) && fs.existsSync(path.join(d, 'initdb')));
  if (!dir) {
    throw new Error(
      'PostgreSQL server binaries (postgres, initdb) not found via PGDS_PG_BINDIR, `pg_config --bindir` ' +
        'or /usr/lib/postgresql/15/bin: apt-get install -y postgresql-15',
    );
  }
  return dir;
}

/** `{uid, gid}` of the `postgres` user when we are root (Postgres refuses to run as root). */
function pgOwner() {
  if (process.getuid() !== 0) return {};
  try {
    const uid = Number(execFileSync('id', ['-u', 'postgres'], { encoding: 'utf8' }).trim());
    const gid = Number(execFileSync('id', ['-g', 'postgres'], { encoding: 'utf8' }).trim());
    return { uid, gid };
  } catch {
    throw new Error("running as root needs a 'postgres' user to run the cluster as (the postgresql-15 package creates it)");
  }
}

const PG_SETTINGS = {
  listen_addresses: '127.0.0.1',
  wal_level: 'logical',
  max_replication_slots: '10',
  max_wal_senders: '10',
  wal_sender_timeout: '10s',
  fsync: 'off',
  shared_buffers: '32MB',
  max_connections: '30',
};

/**
 * A throw-away cluster. Returns `{port, url(db), createDb(name), query(db, sql, params), stop(),
 * logTail(n), log}`.
 */
export async function startPostgres() {
  const bindir = pgBindir();
  const owner = pgOwner();
  const dir = tempDir('pgds-node-pg-');
  if (owner.uid !== undefined) fs.chownSync(dir, owner.uid, owner.gid);
  const log = path.join(dir, 'postgres.log');
  const env = { ...process.env, ...(owner.uid !== undefined ? { HOME: '/tmp', USER: 'postgres' } : {}) };

  const init = spawnSync(
    path.join(bindir, 'initdb'),
    ['-A', 'trust', '-N', '-U', 'postgres', '-E', 'UTF8', '--locale=C', '-D', path.join(dir, 'data')],
    { cwd: dir, env, ...owner, encoding: 'utf8' },
  );
  if (init.status !== 0) {
    throw new Error(`initdb failed (${init.status ?? init.signal ?? init.error}):\n${init.stdout}${init.stderr}`);
  }

  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const args = ['-D', path.join(dir, 'data'), '-c', `port=${port}`, '-c', `unix_socket_directories=${dir}`];
    for (const [k, v] of Object.entries(PG_SETTINGS)) args.push('-c', `${k}=${v}`);
    const child = spawnLogged(path.join(bindir, 'postgres'), args, { log, env, cwd: dir, ...owner });
    const url = (db) => `postgres://postgres@127.0.0.1:${port}/${db}?sslmode=disable`;
    let exited = false;
    try {
      await waitFor(
        `postgres on port ${port} to accept connections`,
        async () => {
          const c = new pg.Client({ connectionString: url('postgres'), connectionTimeoutMillis: 2000 });
          try {
            await c.connect();
            return true;
          } finally {
            await c.end().catch(() => {});
          }
        },
        {
          timeout: START_TIMEOUT_MS,
          interval: 100,
          check: () => {
            if (child.exitStatus) {
              exited = true;
              throw new Error(`postgres exited during start-up (${describeExit(child.exitStatus)})`);
            }
          },
        },
      );
    } catch (e) {
      await stopChild(child, 'SIGQUIT', 5000);
      if (exited && attempt < PORT_ATTEMPTS && fs.readFileSync(log, 'utf8').includes('could not bind')) continue;
      removeDir(dir);
      throw new Error(`${e.message}; its log ends with:\n${tail(log, 40)}`);
    }
    return {
      port,
      url,
      log,
      logTail: (n = 20) => tail(log, n),
      /** Run one statement (or several without params) on `db`; returns pg's result. */
      async query(db, sql, params) {
        const c = new pg.Client({ connectionString: url(db) });
        await c.connect();
        try {
          return await c.query(sql, params);
        } finally {
          await c.end();
        }
      },
      /** A connected pg.Client on `db` (the caller ends it). */
      async client(db) {
        const c = new pg.Client({ connectionString: url(db) });
        await c.connect();
        return c;
      },
      async createDb(name) {
        await this.query('postgres', `CREATE DATABASE "${name}"`);
        return url(name);
      },
      /** Immediate shutdown (SIGQUIT, SIGKILL after 10 s) and removal of the data dir. */
      async stop() {
        await stopChild(child, 'SIGQUIT', 10_000);
        removeDir(dir);
      },
    };
  }
}

// ---------------------------------------------------------------------------------------------
// Durable Streams servers

/** The official Rust server, `durable-streams-server --durability wal`, on a free port. */
export async function startRustStreamsServer() {
  const bin = process.env.PGDS_STREAMS_SERVER || path.join(ROOT, '.tools/bin/durable-streams-server');
  if (!fs.existsSync(bin)) {
    throw new Error(
      `durable-streams-server not found at ${bin}: run scripts/test once (it installs it into .tools/) ` +
        'or set PGDS_STREAMS_SERVER',
    );
  }
  const dir = tempDir('pgds-node-streams-');
  const log = path.join(dir, 'server.log');
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const child = spawnLogged(
      bin,
      ['--host', '127.0.0.1', '--port', String(port), '--data-dir', path.join(dir, 'data'), '--durability', 'wal', '--long-poll-timeout-ms', '2000'],
      { log, env: process.env },
    );
    let exited = false;
    try {
      await waitFor(`durable-streams-server on port ${port}`, () => canConnect(port), {
        timeout: START_TIMEOUT_MS,
        check: () => {
          if (child.exitStatus) {
            exited = true;
            throw new Error(`durable-streams-server exited during start-up (${describeExit(child.exitStatus)})`);
          }
        },
      });
    } catch (e) {
      await stopChild(child, 'SIGKILL', 5000);
      if (exited && attempt < PORT_ATTEMPTS && /in use/i.test(fs.readFileSync(log, 'utf8'))) continue;
      removeDir(dir);
      throw new Error(`${e.message}; its log ends with:\n${tail(log, 30)}`);
    }
    return {
      name: 'durable-streams-server (Rust)',
      baseUrl: `http://127.0.0.1:${port}`,
      logTail: (n = 20) => tail(log, n),
      async stop() {
        await stopChild(child, 'SIGTERM', 10_000);
        removeDir(dir);
      },
    };
  }
}

/**
 * The Node reference server (`@durable-streams/server`), in this process, in memory.
 *
 * Not file-backed (`dataDir`): in 0.3.7 its FileBackedStreamStore writes an append's frame to
 * the segment file before it updates the stream's offset in LMDB, and `read()` returns every
 * frame in the file. A reader that is behind can thus receive an append still in flight, and its
 * next request (at that newer offset) is answered with the older, committed offset as
 * `Stream-Next-Offset` and an empty body: the client steps back and reads those messages twice.
 * Reproduced with plain fetch and no pgds (one writer, one lagging reader per stream), so it is
 * the server's; the in-memory store appends synchronously and has no such window.
 */
export async function startNodeStreamsServer() {
  const { DurableStreamTestServer } = await import('@durable-streams/server');
  const server = new DurableStreamTestServer({ host: '127.0.0.1', port: 0, longPollTimeout: 2000 });
  const url = await server.start();
  return {
    name: '@durable-streams/server (Node reference)',
    baseUrl: url.replace(/\/$/, ''),
    logTail: () => '(in-process: its output is in the test output)',
    async stop() {
      await server.stop();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// pgds

export function pgdsBinary() {
  const bin = process.env.PGDS_BIN || path.join(ROOT, 'target/debug/pgds');
  if (!fs.existsSync(bin)) {
    throw new Error(`no pgds binary at ${bin}: build it first (cargo build) or set PGDS_BIN to its path`);
  }
  return bin;
}

/**
 * Start `pgds run --config FILE` with `configToml` and wait until its replication slot `slot` is
 * active in `pgUrl`'s database. `env` adds variables (e.g. PGDS__POSTGRES__URL).
 */
export async function startPgds({ configToml, slot, pg, db, env = {} }) {
  const bin = pgdsBinary();
  const dir = tempDir('pgds-node-run-');
  const config = path.join(dir, 'pgds.toml');
  fs.writeFileSync(config, configToml);
  const log = path.join(dir, 'pgds.log');
  const childEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('PGDS__')));
  Object.assign(childEnv, { RUST_LOG: 'pgds=debug', NO_COLOR: '1' }, env);
  delete childEnv.RUST_BACKTRACE;
  const child = spawnLogged(bin, ['run', '--config', config], { log, env: childEnv });
  const handle = {
    log,
    pid: child.pid,
    logTail: (n = 60) => tail(log, n),
    /** Throw (with the log) when pgds is no longer running. */
    assertRunning() {
      if (child.exitStatus) {
        throw new Error(`pgds exited unexpectedly (${describeExit(child.exitStatus)}); its log ends with:\n${tail(log, 60)}`);
      }
    },
    /** SIGTERM (graceful shutdown), SIGKILL after 30 s; returns {code, signal}. The log stays
     *  until the test process exits. */
    stop() {
      return stopChild(child, 'SIGTERM', 30_000);
    },
  };
  await waitFor(
    `pgds to start replicating (slot ${slot} active)`,
    async () => {
      const r = await pg.query(db, 'SELECT active FROM pg_replication_slots WHERE slot_name = $1', [slot]);
      return r.rows[0]?.active === true;
    },
    { timeout: START_TIMEOUT_MS, interval: 100, check: () => handle.assertRunning(), describe: () => `pgds log:\n${tail(log, 60)}` },
  );
  return handle;
}

// ---------------------------------------------------------------------------------------------
// The web demo's server (examples/web/server.mjs)

/** Start examples/web/server.mjs on a free port, proxying /v1/stream/ to `streamsUrl`. */
export async function startWebServer({ streamsUrl }) {
  const webDir = path.join(ROOT, 'examples/web');
  if (!fs.existsSync(path.join(webDir, 'node_modules'))) {
    throw new Error(`examples/web/node_modules is missing: run npm ci in examples/web (tests/node/run does)`);
  }
  const dir = tempDir('pgds-node-web-');
  const log = path.join(dir, 'web.log');
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const child = spawnLogged(process.execPath, [path.join(webDir, 'server.mjs'), '--port', String(port), '--streams', streamsUrl], {
      log,
      env: process.env,
      cwd: webDir,
    });
    let exited = false;
    try {
      await waitFor(`the web server on port ${port}`, () => canConnect(port), {
        timeout: START_TIMEOUT_MS,
        check: () => {
          if (child.exitStatus) {
            exited = true;
            throw new Error(`server.mjs exited during start-up (${describeExit(child.exitStatus)})`);
          }
        },
      });
    } catch (e) {
      await stopChild(child, 'SIGKILL', 5000);
      if (exited && attempt < PORT_ATTEMPTS && /EADDRINUSE/.test(fs.readFileSync(log, 'utf8'))) continue;
      removeDir(dir);
      throw new Error(`${e.message}; its log ends with:\n${tail(log, 30)}`);
    }
    return {
      url: `http://127.0.0.1:${port}`,
      logTail: (n = 20) => tail(log, n),
      async stop() {
        await stopChild(child, 'SIGTERM', 10_000);
        removeDir(dir);
      },
    };
  }
}

// ---------------------------------------------------------------------------------------------
// A stack of components, stopped in reverse order, with their logs printed on failure

export class Stack {
  constructor() {
    this.parts = []; // [{name, stop, logTail}]
  }

  add(name, part) {
    this.parts.push({ name, part });
    return part;
  }

  /** Print every component's log tail (pgds's longest): call on failure. */
  printLogs() {
    for (const { name, part } of this.parts) {
      if (!part.logTail) continue;
      const n = name === 'pgds' ? 80 : 20;
      console.error(`--- ${name}: last lines of its log ---\n${part.logTail(n)}`);
    }
  }

  /** Run `fn`; on failure print the logs and rethrow. */
  async guard(fn) {
    try {
      return await fn();
    } catch (e) {
      this.printLogs();
      throw e;
    }
  }

  /** Stop everything, last started first; errors are collected, not thrown midway. */
  async stop() {
    const errors = [];
    for (const { name, part } of this.parts.reverse()) {
      try {
        await part.stop?.();
      } catch (e) {
        errors.push(`${name}: ${e.message}`);
      }
    }
    this.parts = [];
    if (errors.length) throw new Error(`clean-up failed: ${errors.join('; ')}`);
  }
}
