"""The warm path of a real `pool serve` (py-hello): between a spawn's request and its reply, no file
is read, no directory listed, no thread started, nothing submitted to an executor, no manifest
parsed. An audit hook in the service process (tests/integration/audit/sitecustomize.py, loaded by
PYTHONPATH) records every such event made with an `rpc_spawn` on the stack.

What a warm spawn may do: write its copy's journal record (journal.write: the record says "live"
before the reply, so a node killed right after the spawn adopts the copy again). Nothing else."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pool.copies.journal import RECORD

pytestmark = pytest.mark.integration
AUDIT = Path(__file__).resolve().parent / "audit"
WARM_SPAWNS = 12


def events(log: Path, since: int) -> tuple[list[tuple[str, str, str]], int]:
    data = log.read_bytes()
    lines = data[since:].decode().splitlines()
    return [tuple(line.split("\t")) for line in lines], len(data)


def is_journal_write(event: tuple[str, str, str], run_dir: Path) -> bool:
    kind, path, flags = event
    p = Path(path)
    return (kind == "open" and p.name == f".{RECORD}.tmp" and p.parent.parent.parent == run_dir
            and flags.isdigit() and int(flags) & os.O_ACCMODE == os.O_WRONLY)


def test_a_warm_spawn_reads_no_file_and_hops_no_thread(service, monkeypatch, tmp_path):
    log = tmp_path / "audit.log"
    monkeypatch.setenv("POOL_TEST_AUDIT", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(AUDIT),
                                                                   os.environ.get("PYTHONPATH")])))
    svc = service("[templates.py-hello]\nmin_warm = 2\nmax_warm = 2\nmax_live = 8\n")
    run_dir = Path(svc.env["POOL_RUN_DIR"])
    with svc.client() as c:
        # The first spawn fills the coordinator's manifest cache: its read proves the hook is live.
        svc.wait_warm("py-hello", 2)
        c.spawn("py-hello").kill(grace=0)
        first, offset = events(log, 0)
        assert any(kind == "open" and path.endswith("/manifest.json") for kind, path, _ in first), first

        for _ in range(WARM_SPAWNS):
            svc.wait_warm("py-hello", 2)
            inst = c.spawn("py-hello")
            assert inst.served_by == "warm"
            spawned, offset = events(log, offset)
            inst.kill(grace=0)
            others = [e for e in spawned if not is_journal_write(e, run_dir)]
            assert others == [], f"a warm spawn touched files or threads: {others}"
            assert len(spawned) == 1, spawned  # its journal record, written once
