#!/usr/bin/env bash
# Install node-app's dependencies (typescript 5.9.3, pinned in package-lock.json) into node_modules/.
# Skipped when they are already there. typescript 7.x has no transpile API: never take "latest".
set -euo pipefail
cd "$(dirname "$0")"
want=$(node -p 'require("./package-lock.json").packages["node_modules/typescript"].version')
have=$(node -p 'try { require("./node_modules/typescript/package.json").version } catch { "" }')
if [[ "$have" == "$want" ]]; then
    echo "node-app: node_modules is up to date (typescript $have)"
else
    npm ci --no-audit --no-fund --loglevel=error
    echo "node-app: installed typescript $want"
fi
