// The text of a delivery_ack. Its outcome lists are serialised once per routed message and
// shared with the message's messages.db record, which stores the same three lists.

import type { DeliveryAckFrame, DeliveryFailure } from './protocol';

export type AckBody = Pick<DeliveryAckFrame, 'msg_id' | 'delivered' | 'failed'> & { queued: string[] };

/** Where a routed message went, as its ack lists it. */
export interface RoutingOutcome {
  delivered: readonly string[];
  failed: readonly DeliveryFailure[];
  queued: readonly string[];
}

/** `"delivered":[…],"failed":[…],"queued":[…]` */
export function outcomeFields(outcome: RoutingOutcome): string {
  return `"delivered":${JSON.stringify(outcome.delivered)},"failed":${JSON.stringify(outcome.failed)},"queued":${JSON.stringify(outcome.queued)}`;
}

/** `{"type":"delivery_ack",…,"queued":[…]` — an ack without its timestamp and closing brace. */
export function ackPrefix(msgId: string, outcomeText: string): string {
  return `{"type":"delivery_ack","msg_id":${JSON.stringify(msgId)},${outcomeText}`;
}

export function finishAck(prefix: string, duplicate: boolean, now = Date.now()): string {
  return `${prefix}${duplicate ? ',"duplicate":true' : ''},"timestamp":${now}}`;
}
