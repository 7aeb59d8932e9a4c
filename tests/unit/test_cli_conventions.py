"""The `pool` command's conventions: --version, tab completion, --json on node commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

from pool.cli import demo
from pool.cli.main import main

POOL = [sys.executable, "-m", "pool.cli"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"pool (prewarm-pool) {metadata.version('prewarm-pool')}"


def test_tab_completion_lists_the_verbs(tmp_path):
    """bash's completion calls `pool` with argcomplete's protocol; it answers on fd 8."""
    out = tmp_path / "completions"
    line = "pool se"
    env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
           "COMP_POINT": str(len(line))}
    with open(out, "wb") as f:
        saved = os.dup(8) if _is_open(8) else None
        os.dup2(f.fileno(), 8)
        try:
            subprocess.run(POOL, env=env, pass_fds=(8,), check=False, timeout=30,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            if saved is None:
                os.close(8)
            else:
                os.dup2(saved, 8)
                os.close(saved)
    assert set(out.read_text().split("\n")) == {"serve", "set-warm"}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_rm_json(tmp_path, capsys):
    build = tmp_path / "store" / "gone" / "b1"       # the store's layout: NAME/current -> a build
    build.mkdir(parents=True)
    (build.parent / "current").symlink_to("b1")
    assert main(["--store", str(tmp_path / "store"), "rm", "gone", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": "gone"}
    assert not build.parent.exists()


def test_a_store_the_user_may_not_read_is_one_clear_line(tmp_path):
    store = tmp_path / "store"
    (store / "x").mkdir(parents=True)
    store.chmod(0o700)
    tmp_path.chmod(0o755)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *POOL,
                        "--store", str(store), "templates"], capture_output=True, text=True,
                       timeout=30, cwd="/")
    assert r.returncode == 1
    assert r.stderr == (f"pool templates: permission denied: {store}: the store and the copies' "
                        "files are root's only; run pool as root\n")


def test_tables_are_as_wide_as_their_data():
    from pool.cli import tables

    long = "t" * 63
    out = tables.render(["NAME", "N", "NOTE"], [[long, 7, "a"], ["x", 12345, None]], right={1})
    lines = out.splitlines()
    assert lines[0] == "NAME" + " " * 59 + "      N  NOTE"
    assert lines[1] == long + "      7  a"
    assert lines[2] == "x" + " " * 62 + "  12345  -"


def test_the_demo_finds_its_templates():
    # `make demo` builds these from the checkout's templates/ folder
    for name in demo.DEMO_TEMPLATES:
        assert (demo.TEMPLATES / name / "template.toml").is_file(), name
