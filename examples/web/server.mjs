// The web demo's server: the page (public/), the app bundled for the browser with esbuild at
// start-up (src/app.js and @durable-streams/client, kept in memory), and a same-origin,
// read-only proxy of /v1/stream/… to the Durable Streams server, so the browser needs no CORS.
// Responses are piped as they arrive: long-poll and SSE pass through unbuffered.
//
//   node server.mjs [--port 8089] [--host 127.0.0.1] [--streams http://127.0.0.1:44379]
//   (or PORT, HOST, STREAMS_URL in the environment)
//
// The proxy is where a real app would authenticate the browser and check that the session's
// user is the one in /v1/stream/user/{id}/…: this demo lets anyone read any user's stream.

import http from 'node:http';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import * as esbuild from 'esbuild';

const here = path.dirname(fileURLToPath(import.meta.url));

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.PORT ?? '8089' },
    host: { type: 'string', default: process.env.HOST ?? '127.0.0.1' },
    streams: { type: 'string', default: process.env.STREAMS_URL ?? 'http://127.0.0.1:44379' },
  },
});
const upstream = new URL(args.streams);
if (upstream.protocol !== 'http:') {
  // The demo's streams server is plain http on loopback; use node:https here for anything else.
  throw new Error(`--streams must be an http:// URL, got ${args.streams}`);
}

// ---- the browser bundle, built once at start-up ----
const built = await esbuild.build({
  entryPoints: [path.join(here, 'src/app.js')],
  bundle: true,
  format: 'esm',
  target: 'es2020',
  sourcemap: 'external',
  outdir: path.join(here, 'dist'), // names only: nothing is written
  write: false,
  logLevel: 'warning',
});
const bundle = {};
for (const file of built.outputFiles) bundle[`/${path.basename(file.path)}`] = file.contents;

const pages = {
  '/': ['public/index.html', 'text/html; charset=utf-8'],
  '/index.html': ['public/index.html', 'text/html; charset=utf-8'],
  '/style.css': ['public/style.css', 'text/css; charset=utf-8'],
};

// ---- the proxy ----
const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'host',
]);

function copyHeaders(from, drop = []) {
  const out = {};
  for (const [k, v] of Object.entries(from)) {
    if (!HOP_BY_HOP.has(k) && !drop.includes(k) && v !== undefined) out[k] = v;
  }
  return out;
}

function proxy(req, res, url) {
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    // Read-only: only pgds writes to the streams.
    res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('read-only proxy\n');
    return;
  }
  // Path and query only: the host is always the streams server's.
  const target = new URL(url.pathname + url.search, upstream.origin);
  let upRes;
  const up = http.request(
    target,
    {
      method: req.method,
      agent,
      // No compression: a compressed response could be held back by the encoder.
      headers: { ...copyHeaders(req.headers, ['accept-encoding']), host: upstream.host },
    },
    (response) => {
      upRes = response;
      res.writeHead(upRes.statusCode ?? 502, copyHeaders(upRes.headers, ['access-control-allow-origin']));
      res.flushHeaders();
      upRes.pipe(res);
      upRes.on('error', () => res.destroy());
    },
  );
  up.on('error', (err) => {
    if (!res.headersSent) {
      res.writeHead(502, { 'content-type': 'text/plain' }).end(`streams server unreachable: ${err.message}\n`);
    } else {
      res.destroy();
    }
  });
  // The browser went away (user switched, tab closed): end the upstream long-poll / SSE too.
  res.on('close', () => {
    if (!upRes?.complete) up.destroy();
  });
  up.end();
}

// ---- the server ----
const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const { pathname } = url;
  try {
    if (pathname.startsWith('/v1/stream/')) return proxy(req, res, url);
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      return res.writeHead(405, { allow: 'GET, HEAD' }).end();
    }
    if (bundle[pathname]) {
      const type = pathname.endsWith('.map') ? 'application/json' : 'text/javascript; charset=utf-8';
      return res.writeHead(200, { 'content-type': type, 'cache-control': 'no-store' }).end(bundle[pathname]);
    }
    if (pages[pathname]) {
      const [file, type] = pages[pathname];
      const body = await fs.readFile(path.join(here, file));
      return res.writeHead(200, { 'content-type': type, 'cache-control': 'no-store' }).end(body);
    }
    res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
  } catch (err) {
    console.error(err);
    if (!res.headersSent) res.writeHead(500).end();
    else res.destroy();
  }
});

server.listen(Number(args.port), args.host, () => {
  console.log(`pgds web demo on http://${args.host}:${args.port}/ (streams: ${upstream.origin})`);
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => {
    server.close();
    server.closeAllConnections();
    agent.destroy();
    process.exit(0);
  });
}
