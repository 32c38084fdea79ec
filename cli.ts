#!/usr/bin/env node
// The `mimiclaw-ws` command: runs the relay until SIGINT/SIGTERM; SIGHUP reloads the key files,
// the TLS certificate and the boss keys file. Startup problems end with one line on stderr that
// names the cause and what to do, and a non-zero exit at once. `node dist/server.js …` runs this same command.

import { BossKeysError } from './lib/boss-keys';
import { helpText, parseCommandLine, UsageError } from './lib/cli-args';
import { runBackup, runRestore, runVerify } from './lib/cli-admin-tools';
import { runConnect, runSend } from './lib/cli-client';
import { runHealth } from './lib/health-check';
import { runMigrate } from './lib/cli-migrate';
import { OptionsError } from './lib/options';
import { DataDirError } from './lib/start-errors';
import { packageVersion } from './lib/version';
import { startRelay } from './server';

/** A start that failed for a reason the operator can fix: printed as one line, exit 1. */
class StartFailure extends Error {}

function listenFailure(error: unknown, port: number, host: string | undefined): StartFailure | undefined {
  const { code, syscall } = error as NodeJS.ErrnoException;
  if (syscall !== 'listen' && syscall !== 'getaddrinfo' && syscall !== 'bind') return undefined;
  if (code === 'EADDRINUSE') return new StartFailure(`Port ${port} is in use: stop the other process or pick another port (mimiclaw-ws <port> …).`);
  if (code === 'EACCES' || code === 'EPERM') return new StartFailure(`Not allowed to listen on port ${port}: pick a port above 1023 or run with the needed rights.`);
  if (code === 'EADDRNOTAVAIL' || code === 'ENOTFOUND' || code === 'EAI_AGAIN') {
    return new StartFailure(`Cannot listen on host "${host ?? ''}": use an address of this machine, e.g. --host 127.0.0.1.`);
  }
  return undefined;
}

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
    if (error instanceof DataDirError || error instanceof BossKeysError) throw new StartFailure(error.message);
    throw listenFailure(error, options.port ?? 8787, options.host) ?? error;
  }
  process.stdout.write(`mimiclaw-ws ${packageVersion()} ready: ${relay.url} ${relay.httpUrl} (data: ${relay.dataDir}, node: ${relay.nodeId}${relay.clusterName === null ? '' : `, cluster: ${relay.clusterName}`})\n`);
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
  // Subcommands (connect, send, health, verify, backup, restore, migrate) are dispatched here; a plain number stays the port.
  if (argv[0] === 'connect') return runConnect(argv.slice(1));
  if (argv[0] === 'send') return runSend(argv.slice(1));
  if (argv[0] === 'health') return runHealth(argv.slice(1));
  if (argv[0] === 'verify') return runVerify(argv.slice(1));
  if (argv[0] === 'backup') return runBackup(argv.slice(1));
  if (argv[0] === 'restore') return runRestore(argv.slice(1));
  if (argv[0] === 'migrate') return runMigrate(argv.slice(1));
  return runRelay(argv);
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    if (error instanceof UsageError || error instanceof OptionsError) {
      process.stderr.write(`mimiclaw-ws: ${error.message}\n`);
    } else if (error instanceof StartFailure) {
      process.stderr.write(`mimiclaw-ws: ${error.message}\n`);
    } else {
      process.stderr.write(`mimiclaw-ws: failed to start: ${error instanceof Error ? error.message : String(error)}\n`);
    }
    // A failed start ends now: nothing left behind (a timer, a half-open store) may keep it alive.
    process.exit(error instanceof UsageError || error instanceof OptionsError ? 2 : 1);
  },
);
