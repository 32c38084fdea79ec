// Builds dist/ whenever npm prepares this folder: `npm install` or `npm ci` in a clone, `npm pack`,
// and an install from a folder or a git URL. A global install of a folder (`npm install -g .`)
// links the folder as it is and installs none of its dependencies, so when the compiler or the
// runtime dependencies are missing they are installed here first (from package-lock.json).
'use strict';
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');

function resolvable(request) {
  try {
    require.resolve(request, { paths: [root] });
    return true;
  } catch {
    return false;
  }
}

function run(command, args, env) {
  const result = spawnSync(command, args, { cwd: root, env, stdio: 'inherit', shell: command.endsWith('.cmd') });
  if (result.error) throw result.error;
  if (result.status !== 0) process.exit(result.status ?? 1);
}

const manifest = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));
const needed = ['typescript', ...Object.keys(manifest.dependencies || {})].map((name) => `${name}/package.json`);
if (!needed.every(resolvable)) {
  // The outer install's settings (global, prefix, omit=dev…) must not leak into this one.
  const env = { ...process.env };
  for (const name of Object.keys(env)) {
    if (/^npm_config_(global|location|prefix|local_prefix|global_prefix|omit|include|production|only|dev|install_links|save.*)$/i.test(name)) delete env[name];
  }
  const execPath = process.env.npm_execpath;
  const npm = execPath && /npm-cli\.c?js$/.test(execPath) ? [process.execPath, execPath] : [process.platform === 'win32' ? 'npm.cmd' : 'npm'];
  const lock = fs.existsSync(path.join(root, 'package-lock.json'));
  process.stderr.write('mimiclaw-ws: installing the build dependencies before compiling\n');
  run(npm[0], [...npm.slice(1), lock ? 'ci' : 'install', '--include=dev', '--ignore-scripts', '--no-audit', '--no-fund'], env);
}

run(process.execPath, [require.resolve('typescript/bin/tsc', { paths: [root] }), '-p', path.join(root, 'tsconfig.json')], process.env);
