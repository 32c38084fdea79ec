// The dashboard at GET / and /admin: one self-contained page (inline CSS and script, no CDN,
// no front-end build), so it ships inside the package and the standalone binaries. It reads
// the workforce once, then follows GET /api/events; it never polls. Rows are keyed by id and
// patched in place from the events (status, health, the summary), so a workforce of thousands
// stays responsive and connects do not make the page re-fetch it. All data is inserted as
// text, never as HTML.

import { createHash } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';

const STYLE = `
:root { color-scheme: light dark; --bg:#f7f7f9; --panel:#fff; --fg:#1b1d22; --muted:#5c6370; --line:#d9dce3;
  --accent:#2456c7; --ok:#1a7f37; --warn:#9a6700; --bad:#c42b1c; --chip:#eef1f7; --focus:#2456c7; }
@media (prefers-color-scheme: dark) { :root { --bg:#121417; --panel:#1b1e23; --fg:#e6e8eb; --muted:#a0a7b4; --line:#2f343c;
  --accent:#8ab4ff; --ok:#56d364; --warn:#e3b341; --bad:#ff7b72; --chip:#262b33; --focus:#8ab4ff; } }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background:var(--bg); color:var(--fg); }
header { display:flex; flex-wrap:wrap; gap:12px; align-items:center; padding:12px 20px; border-bottom:1px solid var(--line); background:var(--panel); }
header h1 { font-size:18px; margin:0 12px 0 0; }
.summary { display:flex; gap:14px; flex-wrap:wrap; color:var(--muted); }
.summary b { color:var(--fg); }
.spacer { flex:1; }
main { display:grid; grid-template-columns: minmax(0,2fr) minmax(280px,1fr); gap:16px; padding:16px 20px; }
@media (max-width: 1000px) { main { grid-template-columns: minmax(0,1fr); } }
section { background:var(--panel); border:1px solid var(--line); border-radius:8px; padding:12px 14px; min-width:0; }
section h2 { font-size:15px; margin:0 0 8px; }
.wide { grid-column: 1 / -1; }
.toolbar { display:flex; flex-wrap:wrap; gap:10px; align-items:end; margin-bottom:8px; }
label { display:flex; flex-direction:column; gap:2px; font-size:12px; color:var(--muted); }
input, select, button { font:inherit; color:var(--fg); background:var(--bg); border:1px solid var(--line); border-radius:5px; padding:4px 8px; }
select { max-width:14em; text-overflow:ellipsis; }
button { cursor:pointer; background:var(--chip); }
button:hover { border-color:var(--accent); }
button.danger { color:var(--bad); }
.actions { display:flex; flex-wrap:wrap; gap:4px; }
:focus-visible { outline:2px solid var(--focus); outline-offset:1px; }
.scroll { max-height:460px; overflow:auto; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
td { overflow-wrap:anywhere; }
th { position:sticky; top:0; background:var(--panel); font-weight:600; font-size:12px; color:var(--muted); z-index:1; }
td.mono, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12px; }
.chip { display:inline-block; background:var(--chip); border-radius:10px; padding:0 7px; margin:1px 3px 1px 0; font-size:12px;
  max-width:14em; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; vertical-align:bottom; }
.status-online, .health-healthy { color:var(--ok); font-weight:600; }
.status-offline, .health-degraded { color:var(--warn); font-weight:600; }
.status-banned, .health-unhealthy { color:var(--bad); font-weight:600; }
.reasons { color:var(--muted); font-size:12px; }
.work-busy { color:var(--warn); font-weight:600; }
.work-idle { color:var(--ok); }
#feed { list-style:none; margin:0; padding:0; max-height:460px; overflow:auto; }
#feed li { padding:4px 2px; border-bottom:1px solid var(--line); display:grid; grid-template-columns:auto 1fr auto; column-gap:8px; align-items:baseline; }
#feed li .what { grid-column:1 / -1; grid-row:2; overflow-wrap:anywhere; }
#feed li button { grid-column:3; grid-row:1; font-size:12px; padding:1px 8px; }
#feed time { color:var(--muted); font-size:12px; font-variant-numeric: tabular-nums; }
.kind { font-weight:600; }
.muted { color:var(--muted); }
.live { font-size:12px; padding:2px 8px; border-radius:10px; background:var(--chip); }
.live.on { color:var(--ok); } .live.off { color:var(--bad); }
.pager { display:flex; gap:8px; align-items:center; margin-top:8px; }
dialog { border:1px solid var(--line); border-radius:8px; background:var(--panel); color:var(--fg); max-width:min(720px, 92vw); }
dialog::backdrop { background: rgba(0,0,0,.45); }
pre { white-space:pre-wrap; word-break:break-word; background:var(--bg); padding:8px; border-radius:5px; max-height:60vh; overflow:auto; }
.sr-only { position:absolute; width:1px; height:1px; overflow:hidden; clip:rect(0 0 0 0); white-space:nowrap; }
#notice { color:var(--bad); }
`;

const SCRIPT = String.raw`
'use strict';
const KEY_STORAGE = 'mimiclaw-admin-key';
const FEED_MAX = 300;
const $ = (id) => document.getElementById(id);
// eventAt: per node, the time of the last event applied to it, so an older workforce snapshot
// arriving later does not undo it.
const state = { nodes: new Map(), rows: new Map(), tags: new Set(), eventAt: new Map(), commsOffset: 0, keyWaiter: null, lastEventId: '', retryMs: 1000 };

function el(tag, props, children) {
  const node = document.createElement(tag);
  if (props) for (const k of Object.keys(props)) {
    if (k === 'text') node.textContent = props[k];
    else if (k === 'class') node.className = props[k];
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), props[k]);
    else node.setAttribute(k, props[k]);
  }
  if (children) for (const c of children) if (c) node.append(c);
  return node;
}
function fmtTime(ms) {
  if (!ms) return '-';
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}
function notice(text) { $('notice').textContent = text || ''; }

// ---- the admin key: asked once, kept for this tab ----
function getKey() { return sessionStorage.getItem(KEY_STORAGE) || ''; }
function askKey(reason) {
  if (state.keyWaiter) return state.keyWaiter;
  const dialog = $('key-dialog');
  $('key-reason').textContent = reason;
  $('key-input').value = '';
  state.keyWaiter = new Promise((resolve) => {
    const done = () => {
      dialog.removeEventListener('close', done);
      state.keyWaiter = null;
      const value = dialog.returnValue === 'ok' ? $('key-input').value.trim() : '';
      if (value) sessionStorage.setItem(KEY_STORAGE, value);
      updateKeyButton();
      resolve(value);
    };
    dialog.addEventListener('close', done);
  });
  dialog.showModal();
  return state.keyWaiter;
}
function updateKeyButton() { $('key-button').textContent = getKey() ? 'Forget admin key' : 'Set admin key'; }

async function api(method, path, body) {
  // Writes always need the key, even from loopback: ask before sending, not after a 401.
  if (method !== 'GET' && !getKey()) {
    const key = await askKey('Changes (ban, rotate key, delete) need the relay authkey.');
    if (!key) throw new Error('No admin key given.');
  }
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = {};
    if (getKey()) headers['x-auth-key'] = getKey();
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await res.json().catch(() => ({}));
    if (res.status === 401 && attempt === 0) {
      if (getKey()) sessionStorage.removeItem(KEY_STORAGE);
      const key = await askKey(data.message || 'This action needs the admin key.');
      if (!key) throw new Error('No admin key given.');
      continue;
    }
    if (!res.ok) throw new Error(data.message || ('HTTP ' + res.status));
    return data;
  }
  throw new Error('The admin key was not accepted.');
}

// ---- employees and bosses: keyed rows patched in place ----
function statusCell(node) {
  const status = el('span', { class: 'status-' + node.status, text: node.status });
  // Which relay node holds the socket (several nodes form one relay: docs/CLUSTER.md).
  return node.node && node.status === 'online' ? el('span', null, [status, el('div', { class: 'reasons', text: 'on ' + node.node })]) : status;
}
function healthCell(node) {
  const h = node.health || { overall: 'unknown', reasons: [] };
  return el('span', null, [el('span', { class: 'health-' + h.overall, text: h.overall }),
    h.reasons.length ? el('div', { class: 'reasons', text: h.reasons.join(', ') }) : null]);
}
function workCell(node) {
  // Dispatch: busy while it holds tasks or says working, idle when it can take one. Rows patched
  // from a connect event have no dispatch view yet: an employee starts idle, capacity unknown
  // until the next workforce read (task events trigger one).
  if (node.status !== 'online') return el('span', { class: 'muted', text: '\u2013' });
  const d = node.dispatch && node.dispatch.status !== 'offline' ? node.dispatch : { status: 'idle', in_progress: 0, capacity: node.dispatch ? node.dispatch.capacity : '?' };
  const busy = d.status !== 'idle' || d.in_progress > 0;
  const label = (d.status === 'dnd' ? 'dnd' : busy ? 'busy' : 'idle') + ' ' + d.in_progress + '/' + d.capacity;
  return el('span', { class: busy ? 'work-busy' : 'work-idle', title: d.in_progress + ' tasks in progress of ' + d.capacity + ' (' + d.status + ')', text: label });
}
function signature(node) {
  const h = node.health || {};
  const d = node.dispatch || {};
  return [node.name, node.tags.join(','), node.status, node.node || '', h.overall, (h.reasons || []).join(','), node.last_seen, d.status, d.in_progress, d.capacity, node.credential || ''].join('|');
}
function buildRow(node) {
  const tr = el('tr', { 'data-id': node.id });
  tr.sig = '';
  return tr;
}
function fillRow(tr, node) {
  const sig = signature(node);
  if (tr.sig === sig) return;
  tr.sig = sig;
  tr.dataset.status = node.status;
  tr.dataset.tags = '\u0000' + node.tags.join('\u0000') + '\u0000';
  tr.dataset.name = (node.name || '').toLowerCase();
  const cells = [el('td', { text: node.name || shortId(node.id), title: node.name || node.id })];
  if (node.role === 'employee') cells.push(el('td', null, node.tags.map((t) => el('span', { class: 'chip', text: t, title: t }))));
  cells.push(el('td', null, [statusCell(node)]));
  if (node.role === 'employee') cells.push(el('td', null, [workCell(node)]));
  cells.push(el('td', null, [healthCell(node)]),
    el('td', { text: fmtTime(node.last_seen), title: new Date(node.last_seen || 0).toISOString() }));
  const who = node.name || node.id;
  const actions = [];
  if (node.role === 'employee') {
    const banned = node.status === 'banned';
    actions.push(el('button', { type: 'button', class: banned ? '' : 'danger', 'data-action': banned ? 'unban' : 'ban',
      'aria-label': (banned ? 'Unban ' : 'Ban ') + who, text: banned ? 'Unban' : 'Ban' }));
  } else {
    cells.splice(1, 0, el('td', { text: node.credential || '-', title: 'Boss key used at its last auth' }));
    cells.push(el('td', { class: 'mono', text: node.id }));
  }
  actions.push(el('button', { type: 'button', 'data-action': 'rotate', 'aria-label': 'Rotate the key of ' + who, text: 'Rotate key' }),
    el('button', { type: 'button', class: 'danger', 'data-action': 'delete', 'aria-label': 'Delete ' + who, text: 'Delete' }));
  cells.push(el('td', null, [el('div', { class: 'actions' }, actions)]));
  tr.replaceChildren(...cells);
  applyFilter(tr);
}
function upsertNode(node) {
  const known = state.nodes.get(node.id);
  const merged = known ? Object.assign(known, node) : node;
  state.nodes.set(node.id, merged);
  let tr = state.rows.get(node.id);
  if (!tr) {
    tr = buildRow(merged);
    state.rows.set(node.id, tr);
    (merged.role === 'employee' ? $('employees-body') : $('bosses-body')).append(tr);
  }
  fillRow(tr, merged);
  if (merged.role === 'employee') for (const t of merged.tags) addTag(t);
}
function addTag(tag) {
  if (state.tags.has(tag)) return;
  state.tags.add(tag);
  const sorted = Array.from(state.tags).sort();
  for (const id of ['tag-filter', 'comms-tag']) {
    const select = $(id);
    const option = el('option', { value: tag, text: tag, title: tag });
    const next = sorted[sorted.indexOf(tag) + 1];
    const before = next === undefined ? null : select.querySelector('option[value="' + CSS.escape(next) + '"]');
    select.insertBefore(option, before);
  }
}
function applyFilter(tr) {
  const tag = $('tag-filter').value;
  const text = $('name-filter').value.trim().toLowerCase();
  const status = $('status-filter').value;
  if (!tr.dataset.tags) return;
  tr.hidden = (tag !== '' && !tr.dataset.tags.includes('\u0000' + tag + '\u0000')) ||
    (text !== '' && !tr.dataset.name.includes(text) && !tr.dataset.id.includes(text)) ||
    (status !== '' && tr.dataset.status !== status);
}
function applyFilters() {
  let shown = 0;
  for (const tr of $('employees-body').children) { applyFilter(tr); if (!tr.hidden) shown++; }
  $('employees-shown').textContent = shown + ' shown';
}
// Counted from the rows the page holds, which events keep current (as the relay's summary).
function renderSummary() {
  const c = { employee: 0, boss: 0, online: 0, banned: 0, healthy: 0, degraded: 0, unhealthy: 0 };
  for (const node of state.nodes.values()) {
    c[node.role]++;
    if (node.status === 'online') c.online++;
    if (node.status === 'banned') c.banned++;
    if (node.health && node.health.overall in c) c[node.health.overall]++;
  }
  const parts = [['Employees', c.employee], ['Bosses', c.boss], ['Online', c.online], ['Offline', state.nodes.size - c.online],
    ['Banned', c.banned], ['Healthy', c.healthy], ['Degraded', c.degraded], ['Unhealthy', c.unhealthy]];
  $('summary').replaceChildren(...parts.map(([k, v]) => el('span', null, [k + ' ', el('b', { text: String(v) })])));
}
async function loadWorkforce() {
  try {
    const data = await api('GET', '/api/admin/workforce');
    for (const node of data.bosses.concat(data.employees)) {
      if ((state.eventAt.get(node.id) || 0) <= data.timestamp) upsertNode(node);
    }
    renderSummary();
    applyFilters();
    notice('');
  } catch (error) { notice('Could not load the workforce: ' + error.message); }
}
async function loadTasks() {
  try {
    const data = await api('GET', '/api/admin/tasks?limit=1');
    const tags = Object.keys(data.tags).sort();
    $('tasks-body').replaceChildren(...(tags.length ? tags.map((tag) => el('tr', { 'data-tag': tag }, [
      el('td', null, [el('span', { class: 'chip', text: tag === '*' ? 'any' : tag })]),
      el('td', { text: String(data.tags[tag].waiting) }), el('td', { text: String(data.tags[tag].in_progress) })]))
      : [el('tr', null, [el('td', { colspan: '3', class: 'muted', text: 'No tasks waiting or in progress.' })])]));
  } catch (error) { notice('Could not load the task queue: ' + error.message); }
}
const debounced = new Map();
function later(name, fn, ms) {
  if (debounced.has(name)) return;
  debounced.set(name, setTimeout(() => { debounced.delete(name); fn(); }, ms));
}

// ---- the live feed ----
function shortId(id) { return id.length > 16 ? id.slice(0, id.indexOf('-') + 9) + '…' : id; }
function nameOf(ref) {
  if (!ref) return '?';
  if (typeof ref === 'string') { const n = state.nodes.get(ref); return n && n.name ? n.name : shortId(ref); }
  return ref.name || shortId(ref.id);
}
function feedItem(kind, text, extra) {
  const feed = $('feed');
  const at = extra && extra.at ? extra.at : Date.now();
  const li = el('li', null, [el('time', { datetime: new Date(at).toISOString(), text: new Date(at).toLocaleTimeString() }),
    el('span', { class: 'kind', text: kind }), el('span', { class: 'what', text: text }), extra && extra.button ? extra.button : null]);
  feed.prepend(li);
  while (feed.childElementCount > FEED_MAX) feed.lastElementChild.remove();
}
function messageText(ev) {
  const to = Array.isArray(ev.to) ? ev.to.map(nameOf).join(', ') : (ev.to === '*' || ev.to === 'all' || String(ev.to).startsWith('tag:') ? ev.to : nameOf(ev.to));
  const parts = [nameOf(ev.from) + ' \u2192 ' + to + ':', ev.delivered.length + ' delivered'];
  if (ev.failed.length) parts.push(ev.failed.length + ' failed (' + Array.from(new Set(ev.failed.map((f) => f.reason))).join(', ') + ')');
  if (ev.queued.length) parts.push(ev.queued.length + ' queued');
  parts.push(ev.bytes + ' B');
  return parts.join(' ');
}
// The relay's health rules (README "Admin API") applied to what the events tell: any event
// from a node is a fresh heartbeat; only employees are judged by their self reports.
function healthOf(node) {
  const health = Object.assign({}, node.health || {});
  const report = Object.assign({ valid: null, stale: false }, health.self_report);
  let reasons = [];
  if (node.status === 'banned') reasons = ['banned'];
  else if (node.status !== 'online') reasons = ['offline'];
  else if (node.role === 'employee') {
    if (report.valid === null) reasons = ['self_report_missing'];
    else if (!report.valid) reasons = ['self_report_invalid'];
    else if (report.stale) reasons = ['self_report_stale'];
  }
  health.reasons = reasons;
  health.overall = node.status !== 'online' ? 'unhealthy' : reasons.length ? 'degraded' : 'healthy';
  health.status = node.status;
  health.online = node.status === 'online';
  health.self_report = report;
  return health;
}
// Applies an event to a node's row: ref is the event's node, report a self report's validity.
function patchNode(id, status, at, ref, report, holder) {
  const known = state.nodes.get(id);
  if (!known && !ref) return;
  const node = Object.assign({ created_at: at || Date.now(), meta: null, health: null }, known, ref ? { name: ref.name, tags: ref.tags, role: ref.role, id: ref.id } : null);
  if (ref && ref.credential) node.credential = ref.credential;
  node.status = status;
  node.online = status === 'online';
  node.banned = status === 'banned';
  if (holder !== undefined) node.node = holder;
  if (at) node.last_seen = at;
  if (report !== undefined) {
    node.health = Object.assign({}, node.health);
    node.health.self_report = Object.assign({}, node.health.self_report, { valid: report, stale: false, last_report_at: at });
  }
  node.health = healthOf(node);
  if (at) state.eventAt.set(id, at);
  upsertNode(node);
  later('summary', renderSummary, 100);
}
function onRelayEvent(type, ev) {
  if (type === 'connect' || type === 'disconnect' || type === 'ban' || type === 'unban') {
    const known = state.nodes.get(ev.node.id);
    // A ban closes the socket: its disconnect must not turn the row back to offline.
    const status = type === 'connect' ? 'online' : type === 'ban' ? 'banned' : type === 'disconnect' && known && known.status === 'banned' ? 'banned' : 'offline';
    patchNode(ev.node.id, status, ev.at, ev.credential ? Object.assign({ credential: ev.credential }, ev.node) : ev.node, undefined, type === 'connect' ? ev.relay_node || null : type === 'disconnect' ? null : undefined);
    const what = type === 'connect' ? (ev.reconnected ? 'reconnected' : 'connected') : type === 'disconnect' ? 'disconnected (code ' + ev.code + ')' : (type === 'ban' ? 'banned' : 'unbanned') + ' by ' + ev.by;
    feedItem(type, nameOf(ev.node) + ' (' + ev.node.role + ') ' + what, { at: ev.at });
  } else if (type === 'identity_removed') {
    removeNode(ev.node.id);
    const why = ev.reason === 'forgotten' ? 'forgotten after being offline too long' : ev.reason === 'ephemeral' ? 'gone (ephemeral)' : 'deleted by ' + ev.by;
    if (ev.reason !== 'ephemeral') feedItem('removed', nameOf(ev.node) + ' (' + ev.node.role + ') ' + why + (ev.dropped ? ', ' + ev.dropped + ' queued dropped' : ''), { at: ev.at });
  } else if (type === 'key_rotated') {
    feedItem('key', nameOf(ev.node) + ' (' + ev.node.role + ') key rotated by ' + ev.by, { at: ev.at });
  } else if (type === 'health') {
    const known = state.nodes.get(ev.node.id);
    patchNode(ev.node.id, known ? known.status : 'online', ev.at, ev.node, ev.valid);
    feedItem('health', nameOf(ev.node) + ' reported ' + (ev.valid ? 'valid' : 'invalid') + ' health', { at: ev.at });
  } else if (type === 'message') {
    const button = el('button', { type: 'button', text: 'Payload', 'aria-label': 'Show payload of message ' + ev.msg_id, onclick: () => showPayload(ev) });
    feedItem('message', messageText(ev), { at: ev.at, button: button });
    if (state.commsOffset === 0) later('comms', loadComms, 1000);
  } else if (type === 'availability') {
    const known = state.nodes.get(ev.node.id);
    if (known) upsertNode(Object.assign({}, known, { dispatch: { status: ev.status, capacity: ev.capacity, in_progress: ev.in_progress } }));
    feedItem('status', nameOf(ev.node) + ' is ' + ev.status + ' (capacity ' + ev.capacity + ')', { at: ev.at });
  } else if (type.startsWith('task_')) {
    const what = type === 'task_assigned' ? 'assigned to ' + nameOf(ev.employee_id) + ' (attempt ' + ev.attempt + ')'
      : type === 'task_done' ? 'done by ' + nameOf(ev.employee_id)
      : type === 'task_retried' ? 'back in the queue (' + ev.reason + ')' : 'failed (' + ev.reason + ')';
    feedItem('task', ev.target + ' task ' + ev.msg_id + ' ' + what, { at: ev.at });
    later('tasks', loadTasks, 500);
    later('workforce', loadWorkforce, 1500);
  } else if (type === 'delivery_update') {
    feedItem('delivery', 'queued message ' + ev.msg_id + ' to ' + nameOf(ev.id) + ' ' + ev.status, { at: ev.at });
    if (state.commsOffset === 0) later('comms', loadComms, 1000);
  }
}
async function showPayload(ev) {
  const pre = $('payload-body');
  $('payload-title').textContent = 'Message ' + ev.msg_id;
  pre.textContent = 'Loading…';
  $('payload-dialog').showModal();
  const param = ev.from.role === 'boss' ? 'boss_id' : 'employee_id';
  const query = '?limit=500&' + param + '=' + encodeURIComponent(ev.from.id) + '&since=' + (ev.at - 60000) + '&until=' + (ev.at + 60000);
  try {
    const data = await api('GET', '/api/admin/communications' + query);
    const row = data.rows.find((r) => r.msg_id === ev.msg_id);
    pre.textContent = row ? JSON.stringify(row.payload, null, 2)
      : 'This message is not in the boss\u2194employee communications log (messages between two bosses or two employees are not listed there).';
  } catch (error) { pre.textContent = 'Could not load the payload: ' + error.message; }
}

// ---- communications log ----
function commsQuery() {
  const q = new URLSearchParams();
  q.set('limit', $('comms-limit').value);
  q.set('offset', String(state.commsOffset));
  for (const [field, id] of [['boss_id', 'comms-boss'], ['employee_id', 'comms-employee'], ['tag', 'comms-tag']]) {
    const v = $(id).value.trim(); if (v) q.set(field, v);
  }
  for (const [field, id] of [['since', 'comms-since'], ['until', 'comms-until']]) {
    const v = $(id).value; if (v) q.set(field, String(new Date(v).getTime()));
  }
  return q.toString();
}
async function loadComms() {
  try {
    const data = await api('GET', '/api/admin/communications?' + commsQuery());
    $('comms-body').replaceChildren(...data.rows.map((r) => el('tr', null, [
      el('td', { text: fmtTime(r.timestamp) }),
      el('td', { text: nameOf(r.from) + ' \u2192 ' + nameOf(r.to) }),
      el('td', { class: 'status-' + (r.delivery.status === 'delivered' ? 'online' : r.delivery.status === 'failed' ? 'banned' : 'offline'),
        text: r.delivery.status + (r.delivery.reason ? ' (' + r.delivery.reason + ')' : '') }),
      el('td', { class: 'mono', text: r.msg_id }),
      el('td', null, [el('button', { type: 'button', text: 'Payload', 'aria-label': 'Show payload of message ' + r.msg_id, onclick: () => {
        $('payload-title').textContent = 'Message ' + r.msg_id;
        $('payload-body').textContent = JSON.stringify(r.payload, null, 2);
        $('payload-dialog').showModal();
      } })]),
    ])));
    const first = data.total === 0 ? 0 : data.offset + 1;
    $('comms-range').textContent = first + '\u2013' + (data.offset + data.rows.length) + ' of ' + data.total;
    $('comms-prev').disabled = data.offset === 0;
    $('comms-next').disabled = data.offset + data.rows.length >= data.total;
  } catch (error) { $('comms-range').textContent = 'Could not load: ' + error.message; }
}

function removeNode(id) {
  state.nodes.delete(id);
  state.eventAt.delete(id);
  const tr = state.rows.get(id);
  if (tr) { tr.remove(); state.rows.delete(id); }
  later('summary', renderSummary, 100);
  later('filter', applyFilters, 150);
}

// ---- confirmation before a change that cannot be undone ----
function confirmAction(title, text, label) {
  const dialog = $('confirm-dialog');
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = label;
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.showModal();
  });
}

// ---- rotate key / delete ----
async function rotateOrDelete(button, id) {
  const node = state.nodes.get(id) || { id: id, name: null, role: 'node' };
  const who = (node.name || id) + ' (' + node.role + ')';
  const rotate = button.dataset.action === 'rotate';
  const agreed = rotate
    ? await confirmAction('Rotate key', 'Give ' + who + ' a new key? Its current key stops working at once and an open connection is closed (code 4009). The new key is shown once.', 'Rotate key')
    : await confirmAction('Delete identity', 'Delete ' + who + '? An open connection is closed (code 4010), messages queued for it are dropped, and it cannot come back with its key.', 'Delete');
  if (!agreed) return;
  button.disabled = true;
  try {
    const path = '/api/identities/' + encodeURIComponent(id) + (rotate ? '/rotate-key' : '');
    const result = await api(rotate ? 'POST' : 'DELETE', path);
    if (rotate) {
      $('rotated-who').textContent = who;
      $('rotated-key').value = result.key;
      $('rotated-dialog').showModal();
      $('rotated-key').select();
      $('announce').textContent = 'New key for ' + who;
    } else {
      removeNode(id);
      $('announce').textContent = who + ' deleted' + (result.dropped_queued ? ', ' + result.dropped_queued + ' queued messages dropped' : '');
    }
  } catch (error) { notice((rotate ? 'Rotate key' : 'Delete') + ' failed: ' + error.message); }
  finally { button.disabled = false; }
}

// ---- ban / unban ----
async function onNodeClick(event) {
  const button = event.target.closest('button[data-action]');
  if (!button) return;
  const id = button.closest('tr').dataset.id;
  if (button.dataset.action === 'rotate' || button.dataset.action === 'delete') return rotateOrDelete(button, id);
  const ban = button.dataset.action === 'ban';
  button.disabled = true;
  try {
    const result = await api(ban ? 'POST' : 'DELETE', '/api/employees/' + encodeURIComponent(id) + '/ban', ban ? { banned: true } : undefined);
    patchNode(id, result.banned ? 'banned' : result.online ? 'online' : 'offline');
    $('announce').textContent = (result.name || id) + (result.banned ? ' banned' : ' unbanned');
  } catch (error) { notice((ban ? 'Ban' : 'Unban') + ' failed: ' + error.message); }
  finally { button.disabled = false; }
}

// ---- the event stream ----
function connectEvents() {
  const query = new URLSearchParams();
  if (getKey()) query.set('authkey', getKey());
  // A new EventSource does not send Last-Event-ID itself: resume from the last one seen.
  if (state.lastEventId) query.set('lastEventId', state.lastEventId);
  const source = new EventSource('/api/events' + (query.toString() ? '?' + query.toString() : ''));
  const live = $('live');
  source.onopen = () => { live.textContent = 'live'; live.className = 'live on'; state.retryMs = 1000; };
  source.onerror = () => {
    live.textContent = 'reconnecting'; live.className = 'live off';
    // EventSource retries network errors itself; an HTTP error (401, 503) closes it for good.
    // Probe with a read (which asks for the key on 401), then reopen, backing off.
    if (source.readyState !== EventSource.CLOSED) return;
    const wait = state.retryMs;
    state.retryMs = Math.min(30000, state.retryMs * 2);
    setTimeout(async () => {
      try { await api('GET', '/api/admin/workforce'); } catch (error) { /* the relay may be restarting */ }
      connectEvents();
    }, wait);
  };
  const remember = (e) => { if (e.lastEventId) state.lastEventId = e.lastEventId; };
  for (const type of ['connect', 'disconnect', 'message', 'delivery_update', 'ban', 'unban', 'health', 'availability', 'task_assigned', 'task_done', 'task_retried', 'task_failed', 'identity_removed', 'key_rotated']) {
    source.addEventListener(type, (e) => { remember(e); onRelayEvent(type, JSON.parse(e.data)); });
  }
  source.addEventListener('missed', (e) => {
    feedItem('missed', JSON.parse(e.data).message);
    loadWorkforce(); loadComms(); loadTasks();
  });
}

function init() {
  updateKeyButton();
  $('key-button').addEventListener('click', () => {
    if (getKey()) { sessionStorage.removeItem(KEY_STORAGE); updateKeyButton(); } else askKey('Enter the relay authkey; it is kept for this tab only.');
  });
  for (const id of ['tag-filter', 'status-filter']) $(id).addEventListener('change', applyFilters);
  $('name-filter').addEventListener('input', () => later('filter', applyFilters, 150));
  $('employees-body').addEventListener('click', onNodeClick);
  $('bosses-body').addEventListener('click', onNodeClick);
  $('comms-form').addEventListener('submit', (e) => { e.preventDefault(); state.commsOffset = 0; loadComms(); });
  $('comms-prev').addEventListener('click', () => { state.commsOffset = Math.max(0, state.commsOffset - Number($('comms-limit').value)); loadComms(); });
  $('comms-next').addEventListener('click', () => { state.commsOffset += Number($('comms-limit').value); loadComms(); });
  connectEvents();
  loadWorkforce();
  loadComms();
  loadTasks();
}
init();
`;

const BODY = `
<header>
  <h1>mimiclaw-ws</h1>
  <div id="summary" class="summary" aria-label="Workforce summary"></div>
  <span class="spacer"></span>
  <span id="live" class="live off" role="status">connecting</span>
  <button id="key-button" type="button">Set admin key</button>
</header>
<p id="notice" role="alert"></p>
<p id="announce" class="sr-only" aria-live="polite"></p>
<main>
  <section aria-labelledby="employees-title">
    <h2 id="employees-title">Employees <span id="employees-shown" class="muted"></span></h2>
    <div class="toolbar">
      <label>Tag <select id="tag-filter"><option value="">all tags</option></select></label>
      <label>Status <select id="status-filter"><option value="">any</option><option>online</option><option>offline</option><option>banned</option></select></label>
      <label>Name or id <input id="name-filter" type="search" autocomplete="off"></label>
    </div>
    <div class="scroll">
      <table aria-describedby="employees-title">
        <thead><tr><th scope="col">Name</th><th scope="col">Tags</th><th scope="col">Status</th><th scope="col">Work</th><th scope="col">Health</th><th scope="col">Last seen</th><th scope="col">Actions</th></tr></thead>
        <tbody id="employees-body"></tbody>
      </table>
    </div>
  </section>
  <section aria-labelledby="tasks-title">
    <h2 id="tasks-title">Task queue</h2>
    <div class="scroll">
      <table aria-describedby="tasks-title">
        <thead><tr><th scope="col">Tag</th><th scope="col">Waiting</th><th scope="col">In progress</th></tr></thead>
        <tbody id="tasks-body"></tbody>
      </table>
    </div>
  </section>
  <section aria-labelledby="feed-title">
    <h2 id="feed-title">Live feed</h2>
    <ol id="feed" aria-live="polite" aria-relevant="additions" aria-label="Live relay events, newest first"></ol>
  </section>
  <section aria-labelledby="bosses-title">
    <h2 id="bosses-title">Bosses</h2>
    <div class="scroll">
      <table aria-describedby="bosses-title">
        <thead><tr><th scope="col">Name</th><th scope="col">Boss key</th><th scope="col">Status</th><th scope="col">Health</th><th scope="col">Last seen</th><th scope="col">Id</th><th scope="col">Actions</th></tr></thead>
        <tbody id="bosses-body"></tbody>
      </table>
    </div>
  </section>
  <section class="wide" aria-labelledby="comms-title">
    <h2 id="comms-title">Communications</h2>
    <form id="comms-form" class="toolbar">
      <label>Boss id <input id="comms-boss" autocomplete="off" size="24"></label>
      <label>Employee id <input id="comms-employee" autocomplete="off" size="24"></label>
      <label>Employee tag <select id="comms-tag"><option value="">any</option></select></label>
      <label>Since <input id="comms-since" type="datetime-local"></label>
      <label>Until <input id="comms-until" type="datetime-local"></label>
      <label>Per page <select id="comms-limit"><option>25</option><option selected>50</option><option>100</option><option>500</option></select></label>
      <button type="submit">Apply filters</button>
    </form>
    <div class="scroll">
      <table aria-describedby="comms-title">
        <thead><tr><th scope="col">Time</th><th scope="col">From → to</th><th scope="col">Delivery</th><th scope="col">Message id</th><th scope="col">Payload</th></tr></thead>
        <tbody id="comms-body"></tbody>
      </table>
    </div>
    <div class="pager"><button id="comms-prev" type="button">Newer</button><span id="comms-range" aria-live="polite"></span><button id="comms-next" type="button">Older</button></div>
  </section>
</main>
<dialog id="key-dialog" aria-labelledby="key-title">
  <form method="dialog">
    <h2 id="key-title">Admin key</h2>
    <p id="key-reason"></p>
    <label>Relay authkey <input id="key-input" type="password" autocomplete="off" required></label>
    <p><button value="ok">Use key</button> <button value="cancel" formnovalidate>Cancel</button></p>
  </form>
</dialog>
<dialog id="confirm-dialog" aria-labelledby="confirm-title">
  <form method="dialog">
    <h2 id="confirm-title">Confirm</h2>
    <p id="confirm-text"></p>
    <p><button id="confirm-ok" class="danger" value="ok">Confirm</button> <button value="cancel" autofocus>Cancel</button></p>
  </form>
</dialog>
<dialog id="rotated-dialog" aria-labelledby="rotated-title">
  <form method="dialog">
    <h2 id="rotated-title">New key</h2>
    <p>The new key of <b id="rotated-who"></b>. It is shown only this once: copy it now into the client's identity file.</p>
    <label>Identity key <input id="rotated-key" class="mono" readonly size="52"></label>
    <p><button value="close">Done</button></p>
  </form>
</dialog>
<dialog id="payload-dialog" aria-labelledby="payload-title">
  <form method="dialog">
    <h2 id="payload-title">Message</h2>
    <pre id="payload-body"></pre>
    <p><button value="close">Close</button></p>
  </form>
</dialog>
`;

export const DASHBOARD_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mimiclaw-ws dashboard</title>
<style>${STYLE}</style>
</head>
<body>${BODY}<script>${SCRIPT}</script>
</body>
</html>
`;

const ETAG = `"${createHash('sha256').update(DASHBOARD_HTML).digest('base64url').slice(0, 22)}"`;
const BODY_BYTES = Buffer.from(DASHBOARD_HTML, 'utf8');

/** Serves GET/HEAD / and /admin. The page itself holds no data, so it needs no key. */
export function serveDashboard(req: IncomingMessage, res: ServerResponse): void {
  if (req.headers['if-none-match'] === ETAG) {
    res.writeHead(304, { etag: ETAG });
    res.end();
    return;
  }
  res.writeHead(200, {
    'content-type': 'text/html; charset=utf-8',
    'content-length': BODY_BYTES.length,
    'cache-control': 'no-cache',
    etag: ETAG,
    'x-content-type-options': 'nosniff',
    'referrer-policy': 'no-referrer',
    'content-security-policy': "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
  });
  res.end(req.method === 'HEAD' ? undefined : BODY_BYTES);
}
