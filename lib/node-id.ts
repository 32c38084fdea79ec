// A node's stable id: given with --node-id, else read from `node-id` in the data dir, else made
// once and written there, so a restarted node is the same node to the cluster and in /health.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';

const NODE_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

export async function loadNodeId(dataDir: string, given: string | undefined, fileMode: number): Promise<string> {
  if (given !== undefined) return given;
  const file = path.join(dataDir, 'node-id');
  try {
    const stored = (await fs.readFile(file, 'utf8')).trim();
    if (NODE_ID_PATTERN.test(stored)) return stored;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
  }
  const made = `node-${randomBytes(4).toString('hex')}`;
  await fs.writeFile(file, `${made}\n`, { mode: fileMode });
  return made;
}
