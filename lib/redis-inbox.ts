// How requests travel on a node's inbox channel. A message's frame pieces (head and tail: JSON
// text already, the payload inside) are carried raw, not JSON-escaped into the request: escaping
// them on the asking node and unescaping them on the holder cost more than the rest of the
// request, and grew it by a backslash per quote. Each request is its small JSON part (type, ids,
// request id) on one line, then, for a frame, the head and the tail with their lengths named in
// that JSON part (`h`, `l`, in UTF-16 code units, as JavaScript counts them). JSON.stringify never
// writes a raw newline, so the line ends where the JSON part does. A turn's requests to one node
// are simply concatenated (lib/redis-batch.ts, framed publications).

import type { FramePieces } from './cluster-link';
import { isPlainObject } from './protocol';

/** A request's JSON part, and the frame pieces that follow it (deliver and broadcast). */
export interface InboxRequest {
  meta: Record<string, unknown>;
  pieces: FramePieces | null;
}

/** `meta` (without head and tail) as JSON, then the pieces raw; `meta` gets their lengths. */
export function encodeInboxRequest(meta: Record<string, unknown>, pieces: FramePieces | null): string {
  if (pieces === null) return `${JSON.stringify(meta)}\n`;
  meta.h = pieces.head.length;
  meta.l = pieces.tail.length;
  return `${JSON.stringify(meta)}\n${pieces.head}${pieces.tail}`;
}

/**
 * The requests of one inbox publication, in order. A malformed request ends the reading (what
 * follows cannot be framed); `onBroken` hears why.
 */
export function decodeInbox(text: string, onBroken: (why: string) => void): InboxRequest[] {
  const requests: InboxRequest[] = [];
  let at = 0;
  while (at < text.length) {
    const end = text.indexOf('\n', at);
    if (end < 0) {
      onBroken('a request without its line end');
      break;
    }
    let meta: unknown;
    try {
      meta = JSON.parse(text.slice(at, end));
    } catch {
      meta = null;
    }
    if (!isPlainObject(meta)) {
      onBroken('a request whose JSON part is not an object');
      break;
    }
    at = end + 1;
    if (meta.h === undefined && meta.l === undefined) {
      requests.push({ meta, pieces: null });
      continue;
    }
    const headLength = meta.h;
    const tailLength = meta.l;
    if (!isLength(headLength) || !isLength(tailLength) || at + headLength + tailLength > text.length) {
      onBroken('a request whose frame lengths do not fit');
      break;
    }
    const head = text.slice(at, at + headLength);
    at += headLength;
    const tail = text.slice(at, at + tailLength);
    at += tailLength;
    requests.push({ meta, pieces: meta.queueable === true ? { head, tail, queueable: true } : { head, tail } });
  }
  return requests;
}

function isLength(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;
}
