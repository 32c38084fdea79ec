// TLS for the relay's own port (--tls-cert, --tls-key): loads and checks the certificate and key,
// and swaps in a renewed pair without a restart. A renewal is picked up on reload (SIGHUP) and by
// a periodic stat of both files (every tlsReloadIntervalMs): a renewal usually replaces files or
// symlinks, which fs.watch loses track of, while a stat follows the path. A pair that does not
// load (half-written, mismatched, expired) is logged and the one in use is kept.

import { X509Certificate } from 'node:crypto';
import fs from 'node:fs/promises';
import tls from 'node:tls';
import type { Logger } from './logger';
import { warnIfExposed } from './secret-files';

export interface TlsFiles {
  certFile: string;
  keyFile: string;
}

export interface TlsCredentials {
  cert: Buffer;
  key: Buffer;
  /** When the certificate stops being valid (ISO 8601), for logs. */
  validTo: string;
  subject: string;
}

export class TlsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TlsError';
  }
}

async function readPem(file: string, what: string): Promise<Buffer> {
  try {
    return await fs.readFile(file);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? 'error';
    throw new TlsError(`Cannot read the TLS ${what} ${file} (${code}): check the path and that the relay's user may read it.`);
  }
}

/** Reads both files and checks that they form a usable pair that is valid now. */
export async function loadTlsCredentials(files: TlsFiles, logger: Logger): Promise<TlsCredentials> {
  const [cert, key] = await Promise.all([readPem(files.certFile, 'certificate'), readPem(files.keyFile, 'key')]);
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(cert);
  } catch (error) {
    throw new TlsError(`${files.certFile} is not a PEM certificate (${(error as Error).message}): give the certificate chain file, e.g. fullchain.pem.`);
  }
  try {
    tls.createSecureContext({ cert, key });
  } catch (error) {
    throw new TlsError(`The TLS key ${files.keyFile} does not fit the certificate ${files.certFile} (${(error as Error).message}): give the key the certificate was made for.`);
  }
  const validTo = new Date(x509.validTo);
  if (validTo.getTime() <= Date.now()) {
    throw new TlsError(`The certificate ${files.certFile} expired on ${validTo.toISOString()}: renew it.`);
  }
  await warnIfExposed(files.keyFile, 'TLS key', logger);
  return { cert, key, validTo: validTo.toISOString(), subject: x509.subject.replace(/\n/g, ', ') };
}

/** What a server needs to take a new pair: https.Server and tls.Server both have it. */
export interface SecureContextTarget {
  setSecureContext(options: tls.SecureContextOptions): void;
}

export type CertificateReloadResult = 'reloaded' | 'unchanged' | 'failed';

/**
 * Keeps `server` on the current certificate. `reload()` reads the files again and swaps them in
 * when they changed; the timer does the same when a stat shows either file changed.
 */
export class CertificateReloader {
  private current: TlsCredentials;
  /** Stat signature of the pair last tried, so a bad pair is reported once, not every tick. */
  private lastTried: string;
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<CertificateReloadResult> | null = null;

  private constructor(
    private readonly files: TlsFiles,
    private readonly server: SecureContextTarget,
    private readonly logger: Logger,
    initial: TlsCredentials,
    signature: string,
  ) {
    this.current = initial;
    this.lastTried = signature;
  }

  /** Loads the pair (throwing TlsError when it is unusable) and returns it with a reloader to attach. */
  static async load(files: TlsFiles, logger: Logger): Promise<{ credentials: TlsCredentials; attach: (server: SecureContextTarget, intervalMs: number) => CertificateReloader }> {
    const credentials = await loadTlsCredentials(files, logger);
    const signature = await statSignature(files);
    return {
      credentials,
      attach: (server, intervalMs) => {
        const reloader = new CertificateReloader(files, server, logger, credentials, signature);
        if (intervalMs > 0) {
          reloader.timer = setInterval(() => void reloader.checkForChange(), intervalMs);
          reloader.timer.unref();
        }
        return reloader;
      },
    };
  }

  /** Reads both files again and serves them if they changed and load; otherwise keeps the current pair. */
  reload(): Promise<CertificateReloadResult> {
    return (this.running ??= this.load().finally(() => (this.running = null)));
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  private async checkForChange(): Promise<void> {
    if (this.running) return;
    let signature: string;
    try {
      signature = await statSignature(this.files);
    } catch {
      return; // Mid-renewal (a file briefly missing): the next tick looks again.
    }
    if (signature !== this.lastTried) await this.reload();
  }

  private async load(): Promise<CertificateReloadResult> {
    // A file missing now is reported by the load below; '' makes the next tick try again.
    this.lastTried = await statSignature(this.files).catch(() => '');
    try {
      const next = await loadTlsCredentials(this.files, this.logger);
      if (next.cert.equals(this.current.cert) && next.key.equals(this.current.key)) return 'unchanged';
      this.server.setSecureContext({ cert: next.cert, key: next.key });
      this.current = next;
      this.logger.info('tls_certificate_loaded', { cert_file: this.files.certFile, subject: next.subject, valid_to: next.validTo });
      return 'reloaded';
    } catch (error) {
      this.logger.error('tls_certificate_reload_failed', {
        cert_file: this.files.certFile,
        key_file: this.files.keyFile,
        error: (error as Error).message,
        kept_valid_to: this.current.validTo,
      });
      return 'failed';
    }
  }
}

async function statSignature(files: TlsFiles): Promise<string> {
  const [cert, key] = await Promise.all([fs.stat(files.certFile), fs.stat(files.keyFile)]);
  return [cert.ino, cert.size, cert.mtimeMs, key.ino, key.size, key.mtimeMs].join(':');
}
