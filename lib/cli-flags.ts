// Flag parsing for the subcommands (connect, send, verify, backup, restore, migrate): minimist
// with the flags a command knows, so a mistyped flag is refused by name instead of ignored.

import minimist from 'minimist';

/** A command line the command cannot run: the message says what was wrong. */
export class ArgsError extends Error {}

/** Parses `argv`; `--help`/`-h` is always known. Throws ArgsError naming the first unknown option. */
export function parseKnownFlags(argv: string[], strings: readonly string[], booleans: readonly string[]): minimist.ParsedArgs {
  const known = new Set([...strings, ...booleans, 'help', 'h']);
  const unknown: string[] = [];
  const args = minimist(argv, {
    string: [...strings],
    boolean: [...booleans, 'help'],
    alias: { h: 'help' },
    unknown: (arg) => {
      const flag = /^--?(?:no-)?([^=]+)/.exec(arg)?.[1];
      if (flag !== undefined && !known.has(flag)) unknown.push(arg);
      return true;
    },
  });
  if (unknown.length > 0) throw new ArgsError(`unknown option ${unknown[0]!}`);
  return args;
}
