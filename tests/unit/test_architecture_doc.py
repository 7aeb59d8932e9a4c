"""docs/architecture.md and the README's "How it works" are generated from the code's layers and
docstrings: they must not drift from it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_architecture_docs_are_current():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "architecture.py"), "--check"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_module_is_in_the_module_table():
    table = (ROOT / "docs" / "architecture.md").read_text()
    for path in (ROOT / "pool").rglob("*.py"):
        if path.name == "__main__.py":
            continue
        rel = path.relative_to(ROOT)
        assert f"(../{rel})" in table, f"{rel} is missing from docs/architecture.md"


def test_test_modules_have_unique_names():
    # pytest imports test modules by their base name (no packages under tests/): two of one name
    # stop the whole run at collection
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
