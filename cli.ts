#!/usr/bin/env node
// The `mimiclaw-ws` command: runs the relay until SIGINT/SIGTERM; SIGHUP rereads the boss keys
// file. Startup problems end with one line on stderr that says what to do, and a non-zero exit.

import { helpText, parseCommandLine, UsageError } from './lib/cli-args';
import { runConnect, runSend } from './lib/cli-client';
import { OptionsError } from './lib/options';
import { packageVersion } from './lib/version';
import { startRelay } from './server';

async function runRelay(argv: string[]): Promise<number> {
  const command = parseCommandLine(argv);
  if (command.kind === 'help') {
    process.stdout.write(helpText(packageVersion()));
    return 0;
  }
  if (command.kind === 'version') {
    process.stdout.write(`${packageVersion()}\n`);
    return 0;
  }
  const { options } = command;
  let relay;
  try {
    relay = await startRelay(options);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'EADDRINUSE') {
      throw new UsageError(`Port ${options.port ?? 8787} is in use: stop the other process or pick another port (mimiclaw-ws <port> …).`);
    }
    if (code === 'EACCES') {
      throw new UsageError(`Not allowed to listen on port ${options.port ?? 8787}: pick a port above 1023 or run with the needed rights.`);
    }
    if (code === 'EADDRNOTAVAIL' || code === 'ENOTFOUND') {
      throw new UsageError(`Cannot listen on host "${options.host ?? ''}": use an address of this machine, e.g. --host 127.0.0.1.`);
    }
    throw error;
  }
  process.stdout.write(`mimiclaw-ws ${packageVersion()} ready: ${relay.url} ${relay.httpUrl} (data: ${relay.dataDir})\n`);
  await new Promise<void>((resolve) => {
    let stopping = false;
    const stop = () => {
      if (stopping) return;
      stopping = true;
      relay.close().then(resolve, resolve);
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
    // What it reloads (or fails to) is logged by the relay; a failure keeps what is in use.
    process.on('SIGHUP', () => void relay.reload());
  });
  return 0;
}

async function main(argv: string[]): Promise<number> {
  // Subcommands (connect, send) are dispatched here; a plain number stays the port.
  if (argv[0] === 'connect') return runConnect(argv.slice(1));
  if (argv[0] === 'send') return runSend(argv.slice(1));
  return runRelay(argv);
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    if (error instanceof UsageError || error instanceof OptionsError) {
      process.stderr.write(`mimiclaw-ws: ${error.message}\n`);
      process.exitCode = 2;
      return;
    }
    process.stderr.write(`mimiclaw-ws: failed to start: ${(error as Error).message}\n`);
    process.exitCode = 1;
  },
);
