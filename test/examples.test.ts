// examples/: the systemd unit (systemd-analyze verify, and its ExecStart/ExecReload run for
// real), the nginx TLS reverse proxy (nginx -t, then agents and curl through a running nginx),
// and the Dockerfile (no Docker engine here: checked statically, its build stage's files
// compiled and packed, and its ENTRYPOINT/CMD/ENV and HEALTHCHECK run against the built command).

import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { RelayClient } from '../client';
import { ChildRelay, freePort, runToEnd, type Exit } from './child-relay';
import { connect, makeTempDir, startTestRelay, TEST_AUTHKEY, type TestRelay } from './support';
import { httpsGet, makeCertificate, waitUntil, within, type TestCertificate } from './tls-support';

const ROOT = path.resolve(__dirname, '..', '..');
const EXAMPLES = path.join(ROOT, 'examples');
const CLI = path.join(__dirname, '..', 'cli.js');
const childEnv = (extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv => ({ PATH: process.env.PATH, HOME: process.env.HOME, ...extra });

async function which(command: string): Promise<string | null> {
  try {
    const { stdout } = await promisify(execFile)('sh', ['-c', `command -v ${command}`]);
    return stdout.trim() || null;
  } catch {
    return null;
  }
}

/** Splits a command line the way systemd and Docker's shell-less forms do for these files: on blanks. */
function words(line: string): string[] {
  return line.trim().split(/\s+/);
}

// ---- systemd -------------------------------------------------------------------------------

type Unit = Map<string, Map<string, string[]>>;

function parseUnit(text: string): Unit {
  const unit: Unit = new Map();
  let section: Map<string, string[]> | undefined;
  text.split('\n').forEach((raw, index) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) return;
    const header = /^\[([A-Za-z]+)\]$/.exec(line);
    if (header) {
      section = new Map();
      unit.set(header[1]!, section);
      return;
    }
    const setting = /^([A-Za-z]+)=(.*)$/.exec(line);
    assert.ok(setting && section, `line ${index + 1} is neither a [Section] nor Key=value: ${line}`);
    section.set(setting[1]!, [...(section.get(setting[1]!) ?? []), setting[2]!]);
  });
  return unit;
}

describe('examples/mimiclaw-ws.service', () => {
  let text: string;
  let service: Map<string, string[]>;
  let dir: string;
  before(async () => {
    text = await fs.readFile(path.join(EXAMPLES, 'mimiclaw-ws.service'), 'utf8');
    service = parseUnit(text).get('Service') ?? new Map();
    dir = await makeTempDir('mimiclaw-systemd-');
  });
  after(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  test('runs as its own user, with the key from a file, restarting on failure, reloading with SIGHUP', () => {
    const unit = parseUnit(text);
    assert.deepEqual([...unit.keys()], ['Unit', 'Service', 'Install']);
    assert.deepEqual(service.get('User'), ['mimiclaw']);
    assert.deepEqual(service.get('Restart'), ['on-failure']);
    assert.deepEqual(service.get('StateDirectory'), ['mimiclaw-ws']);
    const execStart = words(service.get('ExecStart')![0]!);
    assert.ok(execStart.includes('--authkey-file'), 'ExecStart reads the authkey from a file');
    assert.ok(!execStart.includes('--authkey'), 'no key on the command line');
    assert.equal(execStart[execStart.indexOf('--data-dir') + 1], '/var/lib/mimiclaw-ws');
    assert.deepEqual(service.get('ExecReload'), ['/bin/kill -HUP $MAINPID']);
    assert.deepEqual(unit.get('Install')?.get('WantedBy'), ['multi-user.target']);
  });

  test('systemd-analyze verify finds nothing to report', async (t) => {
    const analyze = await which('systemd-analyze');
    if (!analyze) {
      t.skip('systemd-analyze is not installed: only the parse check above ran');
      return;
    }
    // verify insists that the program exists: a stand-in takes /usr/local/bin/mimiclaw-ws's place.
    const standIn = path.join(dir, 'mimiclaw-ws');
    await fs.writeFile(standIn, '#!/bin/sh\n', { mode: 0o755 });
    const unitFile = path.join(dir, 'mimiclaw-ws.service');
    await fs.writeFile(unitFile, text.replaceAll('/usr/local/bin/mimiclaw-ws', standIn));
    const result = await runToEnd(analyze, ['verify', unitFile], childEnv());
    assert.equal(result.code, 0, result.stderr);
    const complaints = (result.stdout + result.stderr).split('\n').filter((line) => line.includes('mimiclaw-ws'));
    assert.deepEqual(complaints, []);
    // The check can fail: a misspelt key is reported.
    await fs.writeFile(unitFile, text.replaceAll('/usr/local/bin/mimiclaw-ws', standIn).replace('Restart=on-failure', 'Restrat=on-failure'));
    const misspelt = await runToEnd(analyze, ['verify', unitFile], childEnv());
    assert.match(misspelt.stderr, /Unknown key 'Restrat'/);
  });

  test('its ExecStart starts a healthy relay with the key from the file; ExecReload (SIGHUP) keeps it running; SIGTERM exits 0', async () => {
    const port = await freePort();
    const keyFile = path.join(dir, 'authkey');
    await fs.writeFile(keyFile, 'unit-key\n', { mode: 0o640 });
    const dataDir = path.join(dir, 'state');
    const args = words(service.get('ExecStart')![0]!)
      .slice(1)
      .map((word) => word.replace('/etc/mimiclaw-ws/authkey', keyFile).replace('/var/lib/mimiclaw-ws', dataDir).replace(/^8787$/, String(port)));
    const relay = new ChildRelay(process.execPath, [CLI, ...args], childEnv(), port);
    try {
      await relay.waitForHealth();
      const socket = await connect({ url: relay.wsUrl, httpUrl: relay.httpUrl });
      socket.send({ type: 'auth', role: 'boss', authkey: 'unit-key' });
      assert.equal((await socket.next((f) => f.type === 'auth_ok' || f.type === 'error')).type, 'auth_ok');
      await socket.close();
      relay.child.kill('SIGHUP');
      await waitUntil('the relay logs the reload', () => relay.stderr.includes('"event":"relay_reloaded"'));
      assert.equal(relay.child.exitCode, null);
      const health = await runToEnd(process.execPath, [CLI, 'health', '--url', relay.httpUrl], childEnv());
      assert.equal(health.code, 0, health.stderr);
      const exit: Exit = await relay.stop('SIGTERM');
      assert.equal(exit.code, 0, 'a clean stop, which Restart=on-failure leaves stopped');
    } finally {
      if (relay.child.exitCode === null) relay.child.kill('SIGKILL');
    }
  });
});

// ---- nginx ---------------------------------------------------------------------------------

describe('examples/nginx-tls.conf', () => {
  let nginx: string | null;
  let dir: string;
  let cert: TestCertificate;
  let env: TestRelay;
  let httpsPort: number;
  let httpPort: number;
  let confFile: string;
  let running: ReturnType<typeof spawn> | null = null;

  before(async () => {
    nginx = await which('nginx');
    if (!nginx) return;
    dir = await makeTempDir('mimiclaw-nginx-');
    cert = await makeCertificate(dir, 'relay');
    env = await startTestRelay();
    [httpsPort, httpPort] = [await freePort(), await freePort()];
    const { stdout: hash } = await promisify(execFile)('openssl', ['passwd', '-apr1', 'watch-word']);
    // nginx's workers (user nobody when started as root) read the login file at each request.
    await fs.chmod(dir, 0o755);
    await fs.writeFile(path.join(dir, 'htpasswd'), `admin:${hash.trim()}\n`, { mode: 0o644 });
    const site = (await fs.readFile(path.join(EXAMPLES, 'nginx-tls.conf'), 'utf8'))
      .replace(/^\s*listen \[::\]:\d+( ssl)?;\n/gm, '')
      .replace('listen 80;', `listen 127.0.0.1:${httpPort};`)
      .replace('listen 443 ssl;', `listen 127.0.0.1:${httpsPort} ssl;`)
      .replaceAll('/etc/letsencrypt/live/relay.example.com/fullchain.pem', cert.certFile)
      .replaceAll('/etc/letsencrypt/live/relay.example.com/privkey.pem', cert.keyFile)
      .replaceAll('/etc/nginx/mimiclaw-ws.htpasswd', path.join(dir, 'htpasswd'))
      .replace('server 127.0.0.1:8787;', `server 127.0.0.1:${env.relay.port};`);
    assert.ok(site.includes(String(env.relay.port)) && site.includes(cert.certFile), 'the example still has the lines this test adapts');
    await fs.writeFile(path.join(dir, 'site.conf'), site);
    const temp = (name: string) => `${name}_temp_path ${path.join(dir, name)};`;
    confFile = path.join(dir, 'nginx.conf');
    await fs.writeFile(
      confFile,
      [
        'daemon off;',
        'worker_processes 1;',
        `pid ${path.join(dir, 'nginx.pid')};`,
        `error_log ${path.join(dir, 'error.log')} warn;`,
        'events { worker_connections 64; }',
        `http { access_log off; ${['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'].map(temp).join(' ')} include ${path.join(dir, 'site.conf')}; }`,
        '',
      ].join('\n'),
    );
  });
  after(async () => {
    if (running && running.exitCode === null) {
      const exited = new Promise((resolve) => running!.once('exit', resolve));
      running.kill('SIGTERM');
      await exited;
    }
    if (env) await env.dispose();
    if (dir) await fs.rm(dir, { recursive: true, force: true });
  });

  test('nginx -t accepts it', async (t) => {
    if (!nginx) {
      t.skip('nginx is not installed (apt-get install -y nginx-light): the nginx example was not checked');
      return;
    }
    const result = await runToEnd(nginx, ['-t', '-p', dir, '-e', path.join(dir, 'error.log'), '-c', confFile], childEnv());
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stderr, /test is successful/);
  });

  test('agents reach the relay through it over wss://; /health is open, the rest needs the login; http redirects', async (t) => {
    if (!nginx) {
      t.skip('nginx is not installed (apt-get install -y nginx-light): the nginx example was not run');
      return;
    }
    running = spawn(nginx, ['-p', dir, '-e', path.join(dir, 'error.log'), '-c', confFile], { stdio: 'ignore' });
    const base = `https://127.0.0.1:${httpsPort}`;
    await waitUntil('nginx answers /health', async () => (await httpsGet(`${base}/health`, cert.cert).catch(() => ({ status: 0 }))).status === 200);

    const url = `wss://127.0.0.1:${httpsPort}/ws`;
    const worker = new RelayClient({ url, role: 'employee', name: 'Behind-Nginx', tags: ['proxy'], ca: cert.cert, heartbeatIntervalMs: 0 });
    const boss = new RelayClient({ url, role: 'boss', authkey: TEST_AUTHKEY, ca: cert.cert, heartbeatIntervalMs: 0 });
    try {
      const received = new Promise<unknown>((resolve) => worker.on('message', (m) => resolve(m.payload)));
      const workerOk = await within(worker.connect(), 30_000, 'the employee to connect');
      await within(boss.connect(), 30_000, 'the boss to connect');
      assert.deepEqual((await boss.send(workerOk.id, 'through nginx')).delivered, [workerOk.id]);
      assert.equal(await within(received, 30_000, 'the message at the employee'), 'through nginx');
    } finally {
      await Promise.all([worker.close(), boss.close()]);
    }

    assert.equal((await httpsGet(`${base}/employees`, cert.cert)).status, 401);
    const login = `Basic ${Buffer.from('admin:watch-word').toString('base64')}`;
    const employees = await httpsGet(`${base}/employees`, cert.cert, { authorization: login });
    assert.equal(employees.status, 200, await fs.readFile(path.join(dir, 'error.log'), 'utf8'));
    assert.ok(employees.body.includes('Behind-Nginx'));
    const curl = await runToEnd('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code} %{redirect_url}', `http://127.0.0.1:${httpPort}/health`], childEnv());
    assert.equal(curl.stdout, `301 https://127.0.0.1/health`);
  });
});

// ---- Docker --------------------------------------------------------------------------------

interface Instruction {
  keyword: string;
  args: string;
  stage: number;
}

function parseDockerfile(text: string): Instruction[] {
  const instructions: Instruction[] = [];
  let stage = -1;
  const joined = text.replace(/\\\n/g, ' ');
  for (const raw of joined.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const match = /^([A-Z]+)\s+(.*)$/.exec(line);
    assert.ok(match, `not an instruction: ${line}`);
    if (match[1] === 'FROM') stage++;
    instructions.push({ keyword: match[1]!, args: match[2]!.trim(), stage });
  }
  return instructions;
}

/** ["a", "b"] (exec form) as a list. */
function execForm(args: string): string[] {
  const list = JSON.parse(args) as unknown;
  assert.ok(Array.isArray(list) && list.every((item) => typeof item === 'string'), `not the exec form ["…"]: ${args}`);
  return list as string[];
}

describe('examples/Dockerfile (checked without a Docker engine)', () => {
  let instructions: Instruction[];
  let last: number;
  let env: Map<string, string>;
  let dir: string;
  before(async () => {
    instructions = parseDockerfile(await fs.readFile(path.join(EXAMPLES, 'Dockerfile'), 'utf8'));
    last = Math.max(...instructions.map((i) => i.stage));
    env = new Map();
    for (const { args } of instructions.filter((i) => i.keyword === 'ENV' && i.stage === last)) {
      for (const pair of args.split(/\s+/)) {
        const [name, value] = pair.split('=');
        env.set(name!, value!);
      }
    }
    dir = await makeTempDir('mimiclaw-docker-');
  });
  after(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });
  const finalStage = (keyword: string) => instructions.filter((i) => i.keyword === keyword && i.stage === last);

  test('is multi-stage and runs as a non-root user with a volume for the data dir and a HEALTHCHECK', () => {
    const froms = instructions.filter((i) => i.keyword === 'FROM');
    assert.ok(froms.length >= 2, 'multi-stage');
    assert.match(froms[0]!.args, / AS build$/);
    const user = finalStage('USER').at(-1)?.args ?? 'root';
    assert.doesNotMatch(user, /^(root|0)(:|$)/, 'the final stage runs as a non-root user');
    const volume = execForm(finalStage('VOLUME')[0]!.args);
    assert.deepEqual(volume, [env.get('MIMICLAW_RELAY_HOME')], 'the volume is the data dir');
    const healthcheck = finalStage('HEALTHCHECK')[0]!.args;
    const probe = execForm(healthcheck.slice(healthcheck.indexOf('CMD ') + 4));
    assert.deepEqual(probe.slice(0, 2), ['mimiclaw-ws', 'health']);
    assert.deepEqual(execForm(finalStage('ENTRYPOINT')[0]!.args), ['mimiclaw-ws']);
    assert.ok(env.get('MIMICLAW_AUTHKEY_FILE'), 'the authkey comes from a file');
  });

  test('every file it copies from the context exists and is not excluded by its .dockerignore', async () => {
    const ignored = (await fs.readFile(path.join(EXAMPLES, 'Dockerfile.dockerignore'), 'utf8')).split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
    const stages = instructions.filter((i) => i.keyword === 'FROM').map((i) => / AS (\S+)$/.exec(i.args)?.[1]);
    for (const copy of instructions.filter((i) => i.keyword === 'COPY')) {
      const parts = words(copy.args);
      if (parts[0]!.startsWith('--from=')) {
        assert.ok(stages.includes(parts[0]!.slice('--from='.length)), `${copy.args}: no such stage`);
        continue;
      }
      for (const source of parts.slice(0, -1)) {
        await fs.access(path.join(ROOT, source));
        assert.ok(!ignored.includes(source), `${source} is copied but .dockerignore excludes it`);
      }
    }
  });

  test("its build stage's files compile and pack into the npm package it installs", async () => {
    const context = path.join(dir, 'context');
    await fs.mkdir(context);
    for (const copy of instructions.filter((i) => i.keyword === 'COPY' && i.stage === 0)) {
      for (const source of words(copy.args).slice(0, -1)) await fs.cp(path.join(ROOT, source), path.join(context, source), { recursive: true });
    }
    // npm ci stands in as a link to this checkout's node_modules (the same lock file).
    await fs.symlink(path.join(ROOT, 'node_modules'), path.join(context, 'node_modules'));
    const build = await runToEnd(process.execPath, [path.join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', '.'], childEnv(), 120_000, context);
    assert.equal(build.code, 0, build.stdout + build.stderr);
    const packed = await runToEnd('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], childEnv(), 60_000, context);
    assert.equal(packed.code, 0, packed.stderr);
    const files = (JSON.parse(packed.stdout) as { files: { path: string }[] }[])[0]!.files.map((f) => f.path);
    for (const needed of ['dist/cli.js', 'dist/server.js', 'dist/lib/health-check.js', 'docs/PROTOCOL.md', 'README.md']) assert.ok(files.includes(needed), `${needed} is not in the package`);
  });

  test('its ENTRYPOINT, CMD and ENV start a healthy relay, and its HEALTHCHECK command passes, then fails once the relay is gone', async () => {
    const port = await freePort();
    const exposed = finalStage('EXPOSE')[0]!.args;
    const cmd = execForm(finalStage('CMD')[0]!.args);
    assert.equal(cmd[cmd.indexOf('--port') + 1], exposed, 'CMD listens on the EXPOSEd port');
    const keyFile = path.join(dir, 'authkey');
    await fs.writeFile(keyFile, 'docker-key\n', { mode: 0o400 });
    const dataDir = path.join(dir, 'data');
    const containerEnv = childEnv({ ...Object.fromEntries(env), MIMICLAW_RELAY_HOME: dataDir, MIMICLAW_AUTHKEY_FILE: keyFile });
    const args = cmd.map((word) => (word === exposed ? String(port) : word));
    const relay = new ChildRelay(process.execPath, [CLI, ...args, '--host', '127.0.0.1'], containerEnv, port);
    const healthcheck = finalStage('HEALTHCHECK')[0]!.args;
    const probe = execForm(healthcheck.slice(healthcheck.indexOf('CMD ') + 4)).slice(1).map((word) => word.replace(`:${exposed}`, `:${port}`));
    try {
      await relay.waitForHealth();
      assert.ok(relay.stdout.includes(`(data: ${dataDir},`), relay.stdout);
      const socket = await connect({ url: relay.wsUrl, httpUrl: relay.httpUrl });
      socket.send({ type: 'auth', role: 'boss', authkey: 'docker-key' });
      assert.equal((await socket.next((f) => f.type === 'auth_ok' || f.type === 'error')).type, 'auth_ok');
      await socket.close();
      const healthy = await runToEnd(process.execPath, [CLI, ...probe], childEnv());
      assert.equal(healthy.code, 0, healthy.stderr);
    } finally {
      await relay.stop('SIGTERM');
    }
    const gone = await runToEnd(process.execPath, [CLI, ...probe], childEnv());
    assert.equal(gone.code, 1);
    assert.match(gone.stderr, /did not answer/);
  });

  test('`mimiclaw-ws health` exits 1 on an answer other than 200 and 2 on bad arguments', async () => {
    const relay = await startTestRelay();
    try {
      const notFound = await runToEnd(process.execPath, [CLI, 'health', '--url', `${relay.relay.httpUrl}/no-such-page`], childEnv());
      assert.equal(notFound.code, 1);
      assert.match(notFound.stderr, /no-such-page answered 404/);
    } finally {
      await relay.dispose();
    }
    for (const [args, message] of [
      [['http://127.0.0.1:8787'], /unexpected argument .*--url/],
      [['--url', 'ftp://x'], /--url must be http:\/\/ or https:\/\//],
      [['--timeout', 'soon'], /--timeout must be a duration/],
      [['--ca', '/no/such/file'], /--ca \/no\/such\/file cannot be read \(ENOENT\)/],
      [['--verbose'], /unknown option --verbose/],
    ] as const) {
      const result = await runToEnd(process.execPath, [CLI, 'health', ...args], childEnv());
      assert.equal(result.code, 2, args.join(' '));
      assert.match(result.stderr, message);
    }
  });
});
