// `mimiclaw-ws health`: asks a relay's GET /health and exits 0 when it answers 200. It needs
// nothing but the relay's own executable, so a container's HEALTHCHECK or a monitoring script
// can use it where neither curl nor a separate Node is installed.

import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import minimist from 'minimist';
import { parseDuration } from './options';

export const HEALTH_USAGE = 'usage: mimiclaw-ws health [--url http://127.0.0.1:8787] [--ca FILE | --insecure] [--timeout 5s]';

const HEALTH_HELP = `${HEALTH_USAGE}

Asks the relay's GET /health. Exit 0 when it answers 200 (its JSON is printed on stdout),
1 when it does not answer in time or answers otherwise (the reason is one line on stderr),
2 on bad arguments.

  --url URL        the relay's base URL or its /health URL (default http://127.0.0.1:8787)
  --ca FILE        PEM certificate(s) to trust for https:// (a self-signed certificate);
                   env NODE_EXTRA_CA_CERTS works too
  --insecure       skip certificate checks for https:// (a probe from the relay's own host
                   where the certificate names a public host, not 127.0.0.1)
  --timeout 5s     give up after this long
`;

class HealthArgsError extends Error {}

interface HealthCommand {
  url: URL;
  ca: Buffer | undefined;
  insecure: boolean;
  timeoutMs: number;
}

function parseHealth(argv: string[]): HealthCommand | 'help' {
  const known = new Set(['url', 'ca', 'insecure', 'timeout', 'help', 'h']);
  const args = minimist(argv, {
    string: ['url', 'ca', 'timeout'],
    boolean: ['insecure', 'help'],
    alias: { h: 'help' },
    unknown: (arg) => {
      const flag = /^--?(?:no-)?([^=]+)/.exec(arg)?.[1];
      if (flag !== undefined && !known.has(flag)) throw new HealthArgsError(`unknown option ${arg}`);
      if (flag === undefined) throw new HealthArgsError(`unexpected argument ${arg}: give the relay's URL with --url`);
      return true;
    },
  });
  if (args.help) return 'help';
  const text = typeof args.url === 'string' && args.url !== '' ? args.url : 'http://127.0.0.1:8787';
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new HealthArgsError(`--url must be an http:// or https:// URL such as http://127.0.0.1:8787, got "${text}"`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new HealthArgsError(`--url must be http:// or https://, got "${text}"`);
  if (url.pathname === '/') url.pathname = '/health';
  let ca: Buffer | undefined;
  if (typeof args.ca === 'string' && args.ca !== '') {
    try {
      ca = fs.readFileSync(args.ca);
    } catch (error) {
      throw new HealthArgsError(`--ca ${args.ca} cannot be read (${(error as NodeJS.ErrnoException).code ?? 'error'})`);
    }
  }
  const timeoutText = typeof args.timeout === 'string' ? args.timeout : '5s';
  const timeoutMs = parseDuration(timeoutText);
  if (timeoutMs === undefined || timeoutMs <= 0) throw new HealthArgsError(`--timeout must be a duration such as 500ms, 5s or 1m, got "${timeoutText}"`);
  return { url, ca, insecure: Boolean(args.insecure), timeoutMs };
}

function probe(command: HealthCommand): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const options: https.RequestOptions = { method: 'GET', timeout: command.timeoutMs };
    if (command.url.protocol === 'https:') {
      if (command.ca) options.ca = command.ca;
      if (command.insecure) options.rejectUnauthorized = false;
    }
    const request = (command.url.protocol === 'https:' ? https : http).request(command.url, options, (response) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => {
        if (body.length < 65536) body += chunk;
      });
      response.on('end', () => resolve({ status: response.statusCode ?? 0, body }));
      response.on('error', reject);
    });
    request.on('timeout', () => request.destroy(new Error(`no answer within ${command.timeoutMs} ms`)));
    request.on('error', reject);
    request.end();
  });
}

export async function runHealth(argv: string[]): Promise<number> {
  let command: HealthCommand | 'help';
  try {
    command = parseHealth(argv);
  } catch (error) {
    if (!(error instanceof HealthArgsError)) throw error;
    process.stderr.write(`mimiclaw-ws health: ${error.message}\n${HEALTH_USAGE}\n`);
    return 2;
  }
  if (command === 'help') {
    process.stdout.write(HEALTH_HELP);
    return 0;
  }
  try {
    const { status, body } = await probe(command);
    if (status !== 200) {
      process.stderr.write(`mimiclaw-ws health: ${command.url.href} answered ${status}\n`);
      return 1;
    }
    process.stdout.write(body.endsWith('\n') ? body : body + '\n');
    return 0;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? '';
    const certificateProblem = /CERT|SIGNATURE|SELF_SIGNED/.test(code);
    const hint = certificateProblem ? ' (trust its certificate with --ca FILE, or skip the check with --insecure)' : '';
    process.stderr.write(`mimiclaw-ws health: ${command.url.href} did not answer: ${(error as Error).message}${hint}\n`);
    return 1;
  }
}
