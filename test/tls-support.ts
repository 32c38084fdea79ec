// Throwaway certificates for the TLS tests (openssl, as shipped with Debian), renewals that
// replace the files the way certificate tools do, and a look at which certificate a TLS port
// presents right now.

import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs/promises';
import https from 'node:https';
import path from 'node:path';
import tls from 'node:tls';
import { promisify } from 'node:util';
import { createLogger, type Logger } from '../lib/logger';

const run = promisify(execFile);

export interface TestCertificate {
  certFile: string;
  keyFile: string;
  cert: string;
  key: string;
  fingerprint: string;
}

/** A self-signed P-256 certificate for localhost and 127.0.0.1, valid for a day, in `dir`/`name`.{crt,key}. */
export async function makeCertificate(dir: string, name: string, commonName = 'localhost'): Promise<TestCertificate> {
  const certFile = path.join(dir, `${name}.crt`);
  const keyFile = path.join(dir, `${name}.key`);
  await run('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1',
    '-subj', `/CN=${commonName}`, '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-keyout', keyFile, '-out', certFile,
  ]);
  await fs.chmod(keyFile, 0o600);
  const [cert, key] = await Promise.all([fs.readFile(certFile, 'utf8'), fs.readFile(keyFile, 'utf8')]);
  return { certFile, keyFile, cert, key, fingerprint: new X509Certificate(cert).fingerprint256 };
}

/** Writes `next` over the files of `live` the way renewal tools do: a new file renamed over the old. */
export async function renewInPlace(live: { certFile: string; keyFile: string }, next: TestCertificate): Promise<void> {
  await fs.writeFile(`${live.keyFile}.new`, next.key, { mode: 0o600 });
  await fs.rename(`${live.keyFile}.new`, live.keyFile);
  await fs.writeFile(`${live.certFile}.new`, next.cert);
  await fs.rename(`${live.certFile}.new`, live.certFile);
}

/** The SHA-256 fingerprint of the certificate a TLS handshake with 127.0.0.1:`port` gets now. */
export function presentedFingerprint(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', rejectUnauthorized: false }, () => {
      const fingerprint = socket.getPeerCertificate().fingerprint256;
      socket.end();
      resolve(fingerprint);
    });
    socket.once('error', reject);
  });
}

/** Polls `check` until it returns true; fails with `what` after `timeoutMs`. */
export async function waitUntil(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
}

/** A logger that keeps every line as parsed JSON, for asserting on what the relay logged. */
export function capturingLogger(): { logger: Logger; lines: Record<string, unknown>[]; text: () => string } {
  const raw: string[] = [];
  const lines: Record<string, unknown>[] = [];
  const logger = createLogger('debug', (line) => {
    raw.push(line);
    lines.push(JSON.parse(line) as Record<string, unknown>);
  });
  return { logger, lines, text: () => raw.join('') };
}

/** GET over https with `ca` trusted; status and body text. */
export function httpsGet(url: string, ca: string, headers: Record<string, string> = {}): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const request = https.get(url, { ca, headers }, (response) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => (body += chunk));
      response.on('end', () => resolve({ status: response.statusCode ?? 0, body }));
    });
    request.once('error', reject);
  });
}

/** `promise`, or a failure naming `what` after `timeoutMs`: a test waiting on an event must not hang. */
export async function within<T>(promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
