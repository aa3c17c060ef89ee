// Reading a user's stream the way an app does: the official client (`stream` + `subscribeJson`)
// feeding the official State Protocol materializer (`MaterializedState`).

import { stream } from '@durable-streams/client';
import { MaterializedState, isChangeEvent } from '@durable-streams/state';
import { sleep } from './harness.mjs';

/**
 * A live subscription to one stream. `items` holds every message delivered (in order),
 * `offset` the `batch.offset` of the last batch consumed (the resume point), `state` the
 * materialized state. `stopWhen(batch)` (optional) is evaluated after each batch is consumed:
 * when it returns true the subscription stops right there, so `items`/`offset` end exactly at
 * that batch.
 */
export class Reader {
  constructor(url, { offset = '-1', live = true, state = new MaterializedState(), stopWhen } = {}) {
    this.url = url;
    this.startOffset = offset;
    this.live = live;
    this.state = state;
    this.stopWhen = stopWhen;
    this.items = [];
    this.batches = 0;
    this.batchLog = []; // {n, offset, upToDate} per consumed batch, for diagnostics
    this.offset = offset;
    this.error = undefined;
    this.stopped = false;
    this.controller = new AbortController();
  }

  /** Open the session; a stream that does not exist yet (404) is retried until it does. */
  async start() {
    this.res = await stream({
      url: this.url,
      offset: this.startOffset,
      live: this.live,
      signal: this.controller.signal,
      onError: async (err) => {
        if (this.stopped) return undefined;
        if (err?.status === 404) {
          // pgds creates a user's stream with its first event.
          await sleep(100);
          return {};
        }
        return undefined;
      },
    });
    this.unsubscribe = this.res.subscribeJson((batch) => {
      if (this.stopped) return;
      for (const item of batch.items) {
        this.items.push(item);
        if (isChangeEvent(item)) this.state.apply(item);
      }
      this.offset = batch.offset;
      this.batches += 1;
      this.batchLog.push({ n: batch.items.length, offset: batch.offset, upToDate: batch.upToDate });
      if (this.stopWhen?.(batch, this)) this.stop();
    });
    this.res.closed.catch((err) => {
      if (!this.stopped) this.error = err;
    });
    return this;
  }

  /** Stop consuming: nothing after the last consumed batch is taken into `items`/`offset`. */
  stop() {
    if (this.stopped) return;
    this.stopped = true;
    this.unsubscribe?.();
    this.res?.cancel();
    this.controller.abort();
  }

  /** Throw if the session failed. */
  assertHealthy() {
    if (this.error) throw new Error(`reading ${this.url} failed: ${this.error.stack ?? this.error}`);
  }
}

/** Every message of the stream from `offset` to its current end (catch-up, not live). */
export async function readAll(url, offset = '-1') {
  const res = await stream({ url, offset, live: false });
  return res.json();
}

/** `Map(type → Map(key → value))` of a MaterializedState, as a plain sorted object for diffs. */
export function snapshot(state) {
  const out = {};
  for (const type of [...state.types].sort()) {
    const entries = [...state.getType(type).entries()].sort(([a], [b]) => compareKeys(a, b));
    if (entries.length) out[type] = Object.fromEntries(entries);
  }
  return out;
}

/** Numeric keys in numeric order, others as text. */
export function compareKeys(a, b) {
  const na = Number(a);
  const nb = Number(b);
  if (Number.isFinite(na) && Number.isFinite(nb)) return na - nb;
  return a < b ? -1 : a > b ? 1 : 0;
}
