// Creates the relay's data dir so a first run finds it. Never fails the install.
'use strict';
try {
  const os = require('node:os');
  const path = require('node:path');
  const fs = require('node:fs');
  const dir = process.env.MIMICLAW_RELAY_HOME || path.join(os.homedir(), '.mimiclaw-relay');
  // Private: it will hold every message payload (the relay keeps its files 0600).
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
} catch (err) {
  // An unwritable home must not break `npm install`; the relay reports the problem at start.
}
