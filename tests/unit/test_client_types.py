"""The client API's static types: what a type checker (mypy) sees of pool.spawn, Client, AsyncClient,
Instance and the replies (pool/wire/replies.py).

The clients' methods are made at import time from one method table, so their typed signatures are
written into pool/client.py by scripts/client_types.py; these tests check the blocks are current,
that the public modules type-check, that typed application code passes, and that typical mistakes
in such code are caught, each on its own line.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from replyshape import shape_errors

from pool import client
from pool.wire import replies

ROOT = Path(__file__).resolve().parents[2]
TYPED = Path(__file__).resolve().parent / "typed"
PUBLIC = ["pool/__init__.py", "pool/client.py", "pool/errors.py", "pool/wire/replies.py"]


def mypy(tmp_path: Path, *paths: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
         "--no-error-summary", "--hide-error-context", "--cache-dir", str(tmp_path / "mypy-cache"),
         *map(str, paths)], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)


def error_lines(out: str, path: Path) -> set[int]:
    name = re.escape(str(path.relative_to(ROOT)))
    return {int(m.group(1)) for m in re.finditer(rf"^{name}:(\d+): error:", out, re.M)}


def test_typed_method_blocks_are_current():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "client_types.py"), "--check"],
                         capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_public_modules_and_typed_application_code_type_check(tmp_path):
    res = mypy(tmp_path, *PUBLIC, TYPED / "uses_ok.py")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mistakes_in_application_code_are_caught_line_by_line(tmp_path):
    wrong = TYPED / "uses_wrong.py"
    marked = {i for i, line in enumerate(wrong.read_text().splitlines(), 1) if "  # error:" in line}
    assert len(marked) >= 8
    res = mypy(tmp_path, wrong)
    assert res.returncode == 1, res.stdout + res.stderr
    assert error_lines(res.stdout, wrong) == marked, res.stdout


@pytest.mark.parametrize("name", ["Client", "AsyncClient"])
def test_every_client_method_has_a_typed_signature(name):
    # the generated block lists exactly the method table's methods (the --check above keeps their
    # parameters), so a method added to METHODS without a result type fails here
    text = (ROOT / "pool" / "client.py").read_text()
    block = text.split(f"# generated: {name} methods")[1].split(f"# end: {name} methods")[0]
    declared = re.findall(r"^\s+(?:async )?def (\w+)\(", block, re.M)
    assert declared == list(client.METHODS)
    assert all(getattr(fn, "returns", None) for fn in client.METHODS.values())


def test_the_reply_shape_check_finds_each_kind_of_drift():
    ok = {"pong": True, "pid": 7, "node": "local", "draining": False}
    assert shape_errors(ok, replies.Pong) == []
    assert shape_errors({**ok, "extra": 1}, replies.Pong) == \
        ["reply: key 'extra' is not declared in Pong"]
    assert shape_errors({k: v for k, v in ok.items() if k != "pid"}, replies.Pong) == \
        ["reply: missing key 'pid' of Pong"]
    assert shape_errors({**ok, "pid": "7"}, replies.Pong) == ["reply['pid']: expected int, got str '7'"]
    assert shape_errors({**ok, "pid": True}, replies.Pong) == ["reply['pid']: expected int, got bool"]
    chunk = {"data": "text", "offset": 0, "exited": False, "rotated_away": 0}
    assert shape_errors([chunk], list[replies.LogChunk]) == \
        ["reply[0]['data']: expected bytes, got str 'text'"]
    figures = {"warm": {"min_warm": 1}}
    assert any("missing key 'max_live'" in e
               for e in shape_errors(figures, dict[str, replies.PoolFigures]))
