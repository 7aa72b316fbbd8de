// A `solc` command for forge, on top of the npm `solc` package (solc-js): no native compiler
// can be downloaded here. It answers the two calls forge makes:
//   solc --version                       -> the native compiler's version banner
//   solc --standard-json [flags] < input -> standard JSON output on stdout
// Other flags forge passes (--allow-paths, --base-path, --include-path) are accepted and
// ignored: forge puts every source's content into the standard JSON input.
'use strict';
const solc = require('solc');

const args = process.argv.slice(2);
if (args.includes('--version') || args.includes('-v')) {
  process.stdout.write(
    'solc, the solidity compiler commandline interface\nVersion: ' + solc.version() + '\n');
  process.exit(0);
}
if (!args.includes('--standard-json')) {
  process.stderr.write('this solc wrapper supports only --version and --standard-json\n');
  process.exit(2);
}
const chunks = [];
process.stdin.on('data', (c) => chunks.push(c));
process.stdin.on('end', () => {
  const input = Buffer.concat(chunks).toString('utf8');
  process.stdout.write(solc.compile(input));
});
