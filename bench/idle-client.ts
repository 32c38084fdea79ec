// A child process that holds a share of the idle connections, so the load client's own file
// descriptors and memory stay small. Driven over IPC by the idle-connections scenario:
//   parent -> {cmd:'connect', url, count}   child -> {ok:true, connected} | {ok:false, error}
//   parent -> {cmd:'close'}                 child closes its sockets and exits.

import { closeAll, connectEmployees, type AuthedSocket } from './load-client';

interface ConnectCommand {
  cmd: 'connect';
  url: string;
  count: number;
}

interface CloseCommand {
  cmd: 'close';
}

let sockets: AuthedSocket[] = [];

function reply(message: Record<string, unknown>): void {
  process.send?.(message);
}

async function onCommand(command: ConnectCommand | CloseCommand): Promise<void> {
  if (command.cmd === 'connect') {
    try {
      sockets = await connectEmployees(command.url, command.count, 100);
      reply({ ok: true, connected: sockets.length });
    } catch (error) {
      reply({ ok: false, error: error instanceof Error ? error.message : String(error) });
    }
    return;
  }
  closeAll(sockets);
  process.exit(0);
}

if (require.main === module) {
  if (process.send === undefined) {
    process.stderr.write('idle-client is started by the benchmark over IPC\n');
    process.exit(2);
  }
  process.on('message', (command: ConnectCommand | CloseCommand) => void onCommand(command));
  // The benchmark went away: do not linger holding thousands of sockets.
  process.on('disconnect', () => process.exit(0));
}
