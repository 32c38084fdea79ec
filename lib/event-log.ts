// Turns relay events into log lines: connects (with a boss's credential name), disconnects, auth
// failures, bans, identity removals, key rotations and dispatched tasks sent back or given up at
// info, routed messages at debug (metadata only, never the payload).

import type { RelayEvent } from './events';
import type { Logger } from './logger';

export function logRelayEvents(logger: Logger): (event: RelayEvent) => void {
  const debug = logger.isEnabled('debug');
  return (event) => {
    switch (event.type) {
      case 'connect':
        logger.info(event.reconnected ? 'reconnect' : 'auth_ok', {
          id: event.node.id,
          role: event.node.role,
          ...(event.credential !== undefined && { credential: event.credential }),
        });
        return;
      case 'disconnect':
        logger.info('disconnect', { id: event.node.id, role: event.node.role, close_code: event.code });
        return;
      case 'auth_fail':
        logger.info('auth_fail', { code: event.code, role: event.role });
        return;
      case 'ban':
      case 'unban':
        logger.info(event.type, { id: event.node.id, by: event.by });
        return;
      case 'identity_removed':
        // Ephemeral identities come and go with every `send`: their disconnect line says enough.
        if (event.reason !== 'ephemeral') logger.info('identity_removed', { id: event.node.id, role: event.node.role, reason: event.reason, by: event.by, dropped_queued: event.dropped });
        return;
      case 'key_rotated':
        logger.info('key_rotated', { id: event.node.id, role: event.node.role, by: event.by });
        return;
      case 'task_retried':
        logger.info('task_retried', { msg_id: event.msg_id, target: event.target, employee_id: event.employee_id, attempt: event.attempt, reason: event.reason });
        return;
      case 'task_failed':
        logger.info('task_failed', { msg_id: event.msg_id, target: event.target, attempt: event.attempt, reason: event.reason });
        return;
      case 'message':
        if (debug) {
          logger.debug('message', {
            msg_id: event.msg_id,
            from: event.from.id,
            delivered: event.delivered.length,
            failed: event.failed.length,
            queued: event.queued.length,
            bytes: event.bytes,
          });
        }
        return;
      default:
        return;
    }
  };
}
