#!/usr/bin/env bash
# Compile jvm-app (and the pool Java SDK) into build/app.jar against Debian's Jackson jars, and
# generate its deterministic data set data/items.json. Both skipped when already up to date.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sdk="$here/../../pool/java/PoolRuntime.java"
jars=/usr/share/java/jackson-databind.jar:/usr/share/java/jackson-core.jar:/usr/share/java/jackson-annotations.jar
items=${JVM_APP_ITEMS:-220000}  # ~42 MB of JSON

for j in ${jars//:/ }; do
    [[ -f "$j" ]] || { echo "jvm-app: $j missing: run scripts/setup-heavy.sh" >&2; exit 1; }
done

jar="$here/build/app.jar"
if [[ -f "$jar" && "$jar" -nt "$here/App.java" && "$jar" -nt "$here/DataGen.java" && "$jar" -nt "$sdk" ]]; then
    echo "jvm-app: build/app.jar is up to date"
else
    rm -rf "$here/build"
    mkdir -p "$here/build/classes"
    javac --release 17 -cp "$jars" -d "$here/build/classes" "$here/App.java" "$here/DataGen.java" "$sdk"
    # A jar, not a class folder: AppCDS (the peer the benchmark compares with) archives jar classes only.
    jar cf "$jar" -C "$here/build/classes" .
    echo "jvm-app: compiled build/app.jar"
fi

data="$here/data/items.json"
stamp="$here/data/.items-$items"
if [[ -f "$data" && -f "$stamp" && "$stamp" -nt "$here/DataGen.java" ]]; then
    echo "jvm-app: data/items.json is up to date"
else
    mkdir -p "$here/data"
    rm -f "$here"/data/.items-*
    java -XX:-UsePerfData -cp "$jar" DataGen "$data" "$items"
    touch "$stamp"
    echo "jvm-app: generated data/items.json ($(du -m "$data" | cut -f1) MB, $items items)"
fi
