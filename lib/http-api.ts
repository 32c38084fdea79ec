// The admin HTTP API: every route at /X and /api/X, JSON in and out. Reads answer loopback
// clients freely and others only with the authkey (unless --public-reads); writes always need
// it. Errors are {"error":code,"code":code,"message":sentence}.

import type { IncomingMessage, ServerResponse } from 'node:http';
import { verifyDataDir, type AuditReport } from './audit-chain';
import type { TaskDispatch } from './task-dispatch';
import type { IdentityStore } from './identity-store';
import type { Logger } from './logger';
import type { MessageLog } from './message-log';
import type { ResolvedOptions } from './options';
import { isPlainObject } from './protocol';
import { secretMatches, type Router } from './router';
import { communicationsPage, mergePages, MAX_CLUSTER_WINDOW, type CommunicationsPage, type CommunicationsQuery } from './communications';
import { heartbeatStaleMs, listNodes, nodeView, workforceJson, type Liveness } from './workforce';

export type RouteHandler = (req: IncomingMessage, res: ServerResponse) => void;

/** Routes served by other modules (dashboard page, event stream, metrics). */
export interface HttpExtensions {
  dashboard?: RouteHandler;
  events?: RouteHandler;
  metrics?: RouteHandler;
}

export interface HttpApiDeps {
  options: ResolvedOptions;
  router: Router;
  dispatcher: TaskDispatch;
  identities: IdentityStore;
  messageLog: MessageLog;
  logger: Logger;
  startedAt: number;
  version: string;
  activeConnections: () => number;
  extensions: HttpExtensions;
  /** Cluster: its name, whether this node reaches the cluster store now, and the sessions this node holds (in /health). */
  cluster?: () => { name: string; store: 'up' | 'down'; node_connections: number };
  /** Cluster: the other nodes' answers to reads that span the cluster. */
  otherNodes?: OtherNodes;
}

export interface OtherNodes {
  /** Every other live node's page; `missing` names the nodes that did not answer in time. */
  communications(query: CommunicationsQuery): Promise<{ pages: CommunicationsPage[]; missing: string[] }>;
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

const MAX_BODY_BYTES = 64 * 1024;

/** Compact JSON: a workforce of thousands is megabytes more when indented (pipe into jq to read). */
export function sendJson(res: ServerResponse, status: number, body: unknown): void {
  sendJsonBody(res, status, Buffer.from(JSON.stringify(body), 'utf8'));
}

function sendJsonBody(res: ServerResponse, status: number, body: Buffer): void {
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': body.length, 'cache-control': 'no-store' });
  res.end(body);
}

function sendError(res: ServerResponse, error: HttpError): void {
  for (const [name, value] of Object.entries(error.headers)) res.setHeader(name, value);
  sendJson(res, error.status, { error: error.code, code: error.code, message: error.message });
}

/** Reads are free on loopback, with the key, or with --public-reads. */
export function readAllowed(remoteAddress: string | undefined, keyGiven: boolean, publicReads: boolean): boolean {
  return publicReads || keyGiven || isLoopback(remoteAddress);
}

export function isLoopback(address: string | undefined): boolean {
  if (!address) return false;
  return address === '::1' || address.startsWith('127.') || address.startsWith('::ffff:127.');
}

function givenKey(req: IncomingMessage, url: URL): string | undefined {
  const header = req.headers['x-auth-key'];
  const fromHeader = Array.isArray(header) ? header[0] : header;
  return fromHeader ?? url.searchParams.get('authkey') ?? undefined;
}

function bodyTooLarge(): HttpError {
  // The connection is closed after the answer: the rest of the body is not worth reading.
  return new HttpError(413, 'body_too_large', `Request body is over ${MAX_BODY_BYTES} bytes: admin requests take a small JSON body such as {"banned":true}.`, {
    connection: 'close',
  });
}

/**
 * A request that declares a body over the limit, refused before any of it is read. Otherwise a
 * client waiting on Expect: 100-continue (curl does, for bodies over 1 KiB) is told to go on.
 */
function refuseEarly(req: IncomingMessage, res: ServerResponse): HttpError | null {
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > MAX_BODY_BYTES) return bodyTooLarge();
  if (/^100-continue$/i.test(req.headers.expect ?? '')) res.writeContinue();
  return null;
}

/** After a 413 sent while the body still arrives: how long and how much more of it is read and dropped before the socket goes. */
const LINGER_MS = 2000;
const LINGER_BYTES = 1024 * 1024;

/**
 * A lingering close, for an answer sent while the request body is still arriving. Node's server
 * destroys the socket right after a Connection: close answer; the bytes the client is still
 * sending then meet a closed socket, and the kernel answers with a reset that can take the
 * answer in flight with it (in the client, or in a balancer in between, which then drops it).
 * So the socket is only half-closed after the answer, and what still comes is read and dropped
 * until the client closes its side, or for at most LINGER_MS and LINGER_BYTES.
 */
function lingerAfterAnswer(req: IncomingMessage): void {
  const socket = req.socket as IncomingMessage['socket'] & { destroySoon?: () => void };
  let dropped = 0;
  const timer = setTimeout(() => socket.destroy(), LINGER_MS);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
  socket.destroySoon = () => {
    if (socket.writable) socket.end();
  };
  req.on('data', (chunk: Buffer) => {
    dropped += chunk.length;
    if (dropped > LINGER_BYTES) socket.destroy();
  });
  req.resume();
}

/**
 * The JSON body, at most MAX_BODY_BYTES. Past the limit it rejects with a 413 that closes the
 * connection, after which the rest of the body is dropped (lingerAfterAnswer), so the answer
 * reaches the client before the close.
 */
function readBody(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        req.off('data', onData);
        lingerAfterAnswer(req);
        reject(bodyTooLarge());
        return;
      }
      chunks.push(chunk);
    };
    req.on('data', onData);
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8').trim();
      if (text === '') return resolve(undefined);
      try {
        resolve(JSON.parse(text));
      } catch {
        reject(new HttpError(400, 'invalid_body', 'Request body must be JSON, e.g. {"banned":true}.'));
      }
    });
    req.on('error', reject);
  });
}

function intParam(url: URL, name: string, fallback: number | null, min: number, max: number): number | null {
  const raw = url.searchParams.get(name);
  if (raw === null || raw.trim() === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new HttpError(400, 'invalid_query', `Query parameter "${name}" must be a whole number from ${min} to ${max}, got "${raw.slice(0, 40)}".`);
  }
  return value;
}

function textParam(url: URL, name: string): string | null {
  const raw = url.searchParams.get(name);
  return raw === null || raw.trim() === '' ? null : raw.trim();
}

/** An id from the path; malformed %-escapes are refused as a 400 rather than failing as a 500. */
function decodePathId(raw: string): string {
  try {
    return decodeURIComponent(raw);
  } catch {
    throw new HttpError(400, 'invalid_id', `The id in the path is not valid percent-encoding: "${raw.slice(0, 80)}"; encode it with encodeURIComponent.`);
  }
}

/** The page is served at these paths too, so a bookmark or a habit from other tools finds it. */
const DASHBOARD_PATHS = new Set(['/', '/admin', '/admin/', '/index.html']);

export class HttpApi {
  private readonly liveness: Liveness;

  constructor(private readonly deps: HttpApiDeps) {
    this.liveness = {
      lastActivity: (id) => deps.router.lastActivity(id),
      node: (id) => deps.router.locate(id),
      heartbeatStaleMs: heartbeatStaleMs(deps.options.pingIntervalMs),
    };
  }

  handle(req: IncomingMessage, res: ServerResponse): void {
    const refused = refuseEarly(req, res);
    if (refused) {
      lingerAfterAnswer(req);
      return sendError(res, refused);
    }
    this.dispatch(req, res).catch((error: unknown) => {
      if (error instanceof HttpError) {
        sendError(res, error);
        return;
      }
      this.deps.logger.error('http_handler_failed', { path: (req.url ?? '').split('?')[0], error: (error as Error).message });
      if (!res.headersSent) sendError(res, new HttpError(500, 'internal_error', 'The relay failed to answer this request; see its log.'));
      else res.end();
    });
  }

  private async dispatch(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://relay.local');
    const method = req.method ?? 'GET';
    const path = url.pathname === '/api' ? '/' : url.pathname.startsWith('/api/') ? url.pathname.slice(4) : url.pathname;
    const { extensions } = this.deps;

    if (DASHBOARD_PATHS.has(path)) {
      if (url.pathname.startsWith('/api')) throw this.notFound(url.pathname);
      this.allow(method, ['GET', 'HEAD']);
      if (!extensions.dashboard) throw this.notFound(url.pathname);
      return extensions.dashboard(req, res);
    }
    if (path === '/health') {
      this.allow(method, ['GET', 'HEAD']);
      return sendJson(res, 200, this.health());
    }
    const banMatch = /^\/employees\/([^/]+)\/ban$/.exec(path);
    if (banMatch) return this.ban(req, res, url, method, decodePathId(banMatch[1]!));
    const identityMatch = /^\/identities\/([^/]+)(\/rotate-key)?$/.exec(path);
    if (identityMatch) {
      const id = decodePathId(identityMatch[1]!);
      return identityMatch[2] ? this.rotateKey(req, res, url, method, id) : this.deleteIdentity(req, res, url, method, id);
    }

    const reads: Record<string, () => unknown> = {
      '/employees': () => ({ employees: listNodes(this.deps.identities, this.liveness, 'employee') }),
      '/connections': () => ({ connections: listNodes(this.deps.identities, this.liveness) }),
      '/admin/tasks': () => this.tasks(url),
    };
    const read = reads[path];
    if (read) {
      this.allow(method, ['GET', 'HEAD']);
      this.requireReadAccess(req, url);
      const body = read();
      return sendJson(res, 200, body instanceof Promise ? await body : body);
    }
    if (path === '/admin/audit/verify') {
      this.allow(method, ['GET']);
      this.requireReadAccess(req, url);
      return sendJson(res, 200, await this.verifyAudit());
    }
    if (path === '/admin/workforce') {
      this.allow(method, ['GET', 'HEAD']);
      this.requireReadAccess(req, url);
      const shared = this.deps.dispatcher.shared;
      if (shared !== undefined) {
        // Cluster: every employee's availability from the shared store, wherever it is connected.
        const employees = [...this.deps.identities.all()].filter((identity) => identity.role === 'employee').map((identity) => identity.id);
        const views = await shared.workers(employees);
        return sendJsonBody(res, 200, workforceJson(this.deps.identities, this.liveness, textParam(url, 'tag'), Date.now(), (id) => views.get(id) ?? null));
      }
      return sendJsonBody(res, 200, workforceJson(this.deps.identities, this.liveness, textParam(url, 'tag'), Date.now(), (id) => this.deps.dispatcher.workerOf(id)));
    }
    if (path === '/admin/communications') {
      this.allow(method, ['GET', 'HEAD']);
      this.requireReadAccess(req, url);
      return sendJson(res, 200, await this.communications(url));
    }
    const streams: Record<string, RouteHandler | undefined> = { '/events': extensions.events, '/metrics': extensions.metrics };
    const stream = streams[path];
    if (stream) {
      this.allow(method, ['GET']);
      this.requireReadAccess(req, url);
      return stream(req, res);
    }
    throw this.notFound(url.pathname);
  }

  /** One verification at a time: it reads every record, so callers meanwhile share its answer. */
  private verifying: Promise<AuditReport> | null = null;

  private verifyAudit(): Promise<AuditReport> {
    this.verifying ??= this.deps.messageLog
      .flush()
      .then(() => verifyDataDir(this.deps.options.dataDir))
      .finally(() => (this.verifying = null));
    return this.verifying;
  }

  private notFound(path: string): HttpError {
    return new HttpError(404, 'not_found', `No route ${path.slice(0, 80)}: see the README's admin API table (e.g. GET /api/health).`);
  }

  private allow(method: string, methods: string[]): void {
    if (!methods.includes(method)) {
      throw new HttpError(405, 'method_not_allowed', `Use ${methods.join(' or ')} for this route.`, { allow: methods.join(', ') });
    }
  }

  private keyMatches(req: IncomingMessage, url: URL): boolean {
    return secretMatches(givenKey(req, url), this.deps.options.authkey);
  }

  private requireReadAccess(req: IncomingMessage, url: URL): void {
    if (readAllowed(req.socket.remoteAddress, this.keyMatches(req, url), this.deps.options.publicReads)) return;
    throw new HttpError(401, 'unauthorized', 'Reads from a non-loopback address need the authkey: send header x-auth-key or ?authkey= (or start the relay with --public-reads).');
  }

  private requireWriteAccess(req: IncomingMessage, url: URL): void {
    if (this.keyMatches(req, url)) return;
    throw new HttpError(401, 'unauthorized', 'This route changes state: send the authkey in header x-auth-key or as ?authkey=.');
  }

  private health() {
    const counts = this.deps.router.countOnlineEverywhere();
    return {
      ok: true,
      service: 'mimiclaw-websocket',
      version: this.deps.version,
      node: this.deps.router.nodeId,
      now: Date.now(),
      uptime_ms: Date.now() - this.deps.startedAt,
      active_connections: this.deps.activeConnections(),
      online: counts,
      ...(this.deps.cluster !== undefined && { cluster: this.deps.cluster() }),
    };
  }

  /** Part C: dispatched tasks waiting or in progress, with counts per tag. */
  private tasks(url: URL) {
    const limit = intParam(url, 'limit', 1000, 1, 100_000)!;
    const tag = textParam(url, 'tag');
    const now = Date.now();
    const shared = this.deps.dispatcher.shared;
    // Cluster: the tasks of every node, from the shared store.
    if (shared !== undefined) return shared.tasks(now, limit, tag).then(({ tags, total, tasks }) => ({ tags, total, limit, tasks, timestamp: now }));
    const { total, tasks } = this.deps.dispatcher.list(now, limit, tag);
    return { tags: this.deps.dispatcher.counts(), total, limit, tasks, timestamp: now };
  }

  private async communications(url: URL) {
    const filters = {
      boss_id: textParam(url, 'boss_id'),
      employee_id: textParam(url, 'employee_id'),
      tag: textParam(url, 'tag'),
      since: intParam(url, 'since', null, 0, Number.MAX_SAFE_INTEGER),
      until: intParam(url, 'until', null, 0, Number.MAX_SAFE_INTEGER),
    };
    const limit = intParam(url, 'limit', 50, 1, 500)!;
    const offset = intParam(url, 'offset', 0, 0, Number.MAX_SAFE_INTEGER)!;
    const { identities, messageLog, otherNodes } = this.deps;
    if (otherNodes === undefined) {
      const page = await communicationsPage(messageLog, identities, { filters, offset, limit });
      return { total: page.total, offset, limit, filters, rows: page.rows, timestamp: Date.now() };
    }
    // A cluster: every node logs its own senders' messages; merge each node's newest rows.
    if (offset + limit > MAX_CLUSTER_WINDOW) {
      throw new HttpError(400, 'invalid_query', `In a cluster, offset + limit must stay at most ${MAX_CLUSTER_WINDOW}; narrow the query with since/until.`);
    }
    const window = { filters, offset: 0, limit: offset + limit };
    const [own, others] = await Promise.all([communicationsPage(messageLog, identities, window), otherNodes.communications(window)]);
    const page = mergePages([own, ...others.pages], offset, limit);
    return { total: page.total, offset, limit, filters, rows: page.rows, nodes: { answered: others.pages.length + 1, missing: others.missing }, timestamp: Date.now() };
  }

  /** DELETE /identities/:id: answers once the removal is on disk. */
  private async deleteIdentity(req: IncomingMessage, res: ServerResponse, url: URL, method: string, id: string): Promise<void> {
    this.allow(method, ['DELETE']);
    this.requireWriteAccess(req, url);
    const result = await this.deps.router.deleteIdentity(id, 'admin-http');
    if (!result.ok) throw new HttpError(result.status, result.code, result.message);
    await result.written;
    const { identity } = result;
    sendJson(res, 200, { id: identity.id, role: identity.role, name: identity.name, deleted: true, was_online: result.wasOnline, dropped_queued: result.droppedQueued });
  }

  /** POST /identities/:id/rotate-key: the new key is in this answer only, sent once its hash is on disk. */
  private async rotateKey(req: IncomingMessage, res: ServerResponse, url: URL, method: string, id: string): Promise<void> {
    this.allow(method, ['POST']);
    this.requireWriteAccess(req, url);
    const result = await this.deps.router.rotateKey(id, 'admin-http');
    if (!result.ok) throw new HttpError(result.status, result.code, result.message);
    await result.written;
    const { identity } = result;
    sendJson(res, 200, { id: identity.id, role: identity.role, name: identity.name, key: result.key, was_online: result.wasOnline });
  }

  private async ban(req: IncomingMessage, res: ServerResponse, url: URL, method: string, id: string): Promise<void> {
    this.allow(method, ['POST', 'PUT', 'DELETE']);
    this.requireWriteAccess(req, url);
    let banned = true;
    if (method === 'DELETE') {
      banned = false;
    } else {
      const body = await readBody(req);
      const given = isPlainObject(body) ? body.banned : undefined;
      if (body !== undefined && (!isPlainObject(body) || (given !== undefined && typeof given !== 'boolean'))) {
        throw new HttpError(400, 'invalid_body', 'Body must be {"banned":true} or {"banned":false}.');
      }
      if (method === 'PUT' && typeof given !== 'boolean') {
        throw new HttpError(400, 'invalid_body', 'PUT needs a body {"banned":true} or {"banned":false}.');
      }
      if (typeof given === 'boolean') banned = given;
    }
    const result = await this.deps.router.setBan(id, banned, 'admin-http');
    if (!result.ok) throw new HttpError(result.status, result.code, result.message);
    const view = nodeView(result.identity, result.online);
    sendJson(res, 200, { id: view.id, role: view.role, name: view.name, tags: view.tags, banned: view.banned, online: view.online });
  }
}
