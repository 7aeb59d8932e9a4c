#!/usr/bin/env bash
# Compile App.java and the pool Java SDK into build/ (skipped when the classes are newer).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sdk="$here/../../pool/java/PoolRuntime.java"
out="$here/build"

fresh() { [[ -f "$1" && "$1" -nt "$here/App.java" && "$1" -nt "$sdk" ]]; }
if fresh "$out/App.class" && fresh "$out/PoolRuntime.class"; then
    echo "java-hello: build/ is up to date"
    exit 0
fi

mkdir -p "$out"
rm -f "$out"/*.class
javac --release 17 -d "$out" "$here/App.java" "$sdk"
echo "java-hello: compiled into build/"
