// The web demo: one user's todos, live. The page reads only that user's Durable Stream
// (/v1/stream/user/{id}/data, written by pgds) with the official client, from the beginning,
// then stays live (SSE): each State Protocol event (insert / update / delete of a row, keyed by
// type and key) is applied to an in-memory map and the lists are re-rendered. A `reset`
// control message (pgds sends one before it re-sends a user's state, e.g. after a TRUNCATE or
// a resync) drops every row; the rows that follow, between `snapshot-start` and
// `snapshot-end`, are the state again, shown once complete.
//
// `@durable-streams/state`'s MaterializedState does the same bookkeeping; it is inlined here to
// keep the bundle to the client alone.

import { stream } from '@durable-streams/client';

const USERS = ['alice', 'bob'];

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('data-')) node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
};

/**
 * Apply one event to the session's state (type → Map(key → row)), as a State Protocol client
 * materializes it. Control messages: `reset` drops every row; `snapshot-start` / `snapshot-end`
 * bracket a copy of rows, during which the page is not re-rendered (no half-copied state).
 */
function apply(session, event) {
  const { state } = session;
  switch (event?.headers?.control) {
    case 'reset':
      state.clear();
      return;
    case 'snapshot-start':
      session.inSnapshot = true;
      return;
    case 'snapshot-end':
      session.inSnapshot = false;
      return;
    default:
  }
  const op = event?.headers?.operation;
  if (!op || typeof event.type !== 'string') return; // other control messages
  let rows = state.get(event.type);
  if (!rows) state.set(event.type, (rows = new Map()));
  if (op === 'delete') rows.delete(event.key);
  else rows.set(event.key, event.value);
}

function byId(a, b) {
  return Number(a[0]) - Number(b[0]) || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0);
}

// ---- rendering ----

function render(session) {
  const { user, state } = session;
  const todos = [...(state.get('todos') ?? new Map())].sort(byId);
  const open = todos.filter(([, t]) => !t.done).length;
  $('#todos-title').textContent = `${cap(user)}’s todos`;
  $('#todo-count').textContent = todos.length ? `${open} open · ${todos.length - open} done` : '';
  // Rows that arrive while live are highlighted briefly (not those of the initial catch-up).
  const fresh = (key) => (session.live && !session.shown.has(key) ? ' fresh' : '');
  $('#todos').replaceChildren(
    ...todos.map(([key, t]) =>
      el(
        'li',
        { class: `todo${t.done ? ' done' : ''}${fresh(key)}`, 'data-testid': 'todo', 'data-key': key, 'data-done': String(!!t.done) },
        el('span', { class: 'check', ariaHidden: 'true' }, t.done ? '✓' : ''),
        el('span', { class: 'title' }, t.title ?? ''),
        el('span', { class: 'id' }, `#${key}`),
      ),
    ),
  );
  $('#todos-empty').hidden = todos.length > 0;
  session.shown = new Set(todos.map(([key]) => key));

  const docs = [...(state.get('documents') ?? new Map())].sort(byId);
  $('#documents').replaceChildren(
    ...docs.map(([key, d]) =>
      el(
        'li',
        { 'data-testid': 'document', 'data-key': key },
        el('span', { class: 'title' }, d.body ?? ''),
        el('span', { class: 'meta' }, (d.editors ?? []).join(', ')),
      ),
    ),
  );
  $('#documents-empty').hidden = docs.length > 0;

  const news = [...(state.get('news') ?? new Map())].sort(byId);
  $('#news').replaceChildren(...news.map(([key, n]) => el('li', { 'data-testid': 'news', 'data-key': key }, n.message ?? '')));
  $('#news-empty').hidden = news.length > 0;

  $('#events').textContent = `${session.events} events`;
  $('#offset').textContent = session.offset ? `offset ${session.offset}` : '';
}

function setStatus(kind, text) {
  const status = $('#status');
  status.dataset.state = kind;
  status.textContent = text;
}

const cap = (s) => s.charAt(0).toUpperCase() + s.slice(1);

// ---- the stream ----

let current = null;

function open(user) {
  current?.stop();
  const session = {
    user,
    url: new URL(`/v1/stream/user/${encodeURIComponent(user)}/data`, location.href).toString(),
    state: new Map(),
    inSnapshot: false,
    events: 0,
    offset: '',
    live: false,
    shown: new Set(),
    stopped: false,
    controller: new AbortController(),
    res: null,
    stop() {
      this.stopped = true;
      this.controller.abort();
      this.res?.cancel();
    },
  };
  current = session;

  for (const button of document.querySelectorAll('#users button')) {
    button.setAttribute('aria-pressed', String(button.dataset.user === user));
  }
  $('#stream-url').textContent = new URL(session.url).pathname;
  document.title = `${cap(user)} · pgds live todos`;
  render(session);
  setStatus('connecting', 'connecting…');

  (async () => {
    try {
      const res = await stream({
        url: session.url,
        offset: '-1',
        live: 'sse',
        warnOnHttp: false,
        signal: session.controller.signal,
        onError: async (err) => {
          if (session.stopped) return undefined;
          if (err?.status === 404) {
            // pgds creates a user's stream with the first change routed to them.
            setStatus('waiting', 'no changes for this user yet');
            await new Promise((r) => setTimeout(r, 1000));
            return session.stopped ? undefined : {};
          }
          return undefined;
        },
      });
      if (session.stopped) return res.cancel();
      session.res = res;
      res.subscribeJson((batch) => {
        if (session.stopped) return;
        for (const event of batch.items) apply(session, event);
        session.events += batch.items.length;
        session.offset = batch.offset;
        if (!session.inSnapshot) render(session);
        if (batch.upToDate) {
          session.live = true;
          setStatus('live', 'live');
        }
      });
      res.closed.then(
        () => session.stopped || setStatus('error', 'disconnected'),
        (err) => session.stopped || setStatus('error', `error: ${err.message}`),
      );
    } catch (err) {
      if (!session.stopped) setStatus('error', `error: ${err.message}`);
    }
  })();
}

function selectedUser() {
  return new URLSearchParams(location.search).get('user') || USERS[0];
}

function init() {
  const users = [...USERS];
  const initial = selectedUser();
  if (!users.includes(initial)) users.push(initial);
  $('#users').replaceChildren(
    ...users.map((u) =>
      el('button', { type: 'button', 'data-user': u, 'data-testid': `user-${u}`, onclick: () => switchTo(u) }, cap(u)),
    ),
  );
  open(initial);
}

function switchTo(user) {
  if (current?.user === user) return;
  const url = new URL(location.href);
  url.searchParams.set('user', user);
  history.pushState({ user }, '', url);
  open(user);
}

window.addEventListener('popstate', () => open(selectedUser()));
init();
