"""CRIU's page server for lazy forks over mutual TLS (--tls with the nodes' certificate files): a
target with the cluster's certificate gets every page; a lazy-pages daemon whose certificate another
CA signed is refused, the restore fails typed and the source copy runs on."""
from __future__ import annotations

import pytest
import test_lazy
from test_lazy import ask, free_port
from tlscerts import Cluster

from pool.copies.fork import checkpoint_instance_lazy, restore_lazy
from pool.copies.restore import Identity
from pool.cr.criu import Criu
from pool.errors import RestoreError
from pool.wire.tls import TlsFiles

pytestmark = pytest.mark.integration
pipe_max_size = test_lazy.pipe_max_size   # fixtures shared with the lazy tests
counter_big = test_lazy.counter_big


def with_tls(criu: Criu, files: TlsFiles) -> Criu:
    c = Criu(criu.binary)
    c.page_server_tls = files
    return c


def test_lazy_pages_over_tls_and_a_rogue_target_refused(pipe_max_size, counter_big, criu,
                                                        restorer, tmp_path):
    certs = Cluster(tmp_path / "certs")
    rogue = TlsFiles.load(certs.impostor(Cluster(tmp_path / "rogue"), "n2"))
    source = with_tls(criu, certs.node("n1"))
    orig = restorer.spawn("counter-big", Identity("tls-source"))
    moved = daemon = None
    try:
        ask(orig, "/inc")
        checksum = ask(orig, "/sum")["sum"]
        server = ("127.0.0.1", free_port())
        lazy = checkpoint_instance_lazy(orig, tmp_path / "bad", source, server, leave_running=True)
        with pytest.raises(RestoreError):        # the page server refuses the rogue's certificate
            moved, daemon = restore_lazy(lazy.template, with_tls(criu, rogue), tmp_path / "run-bad",
                                         server, instance_id="rogue", timeout=8)
        lazy.abort()
        assert ask(orig, "/inc")["count"] == 2   # the source runs on

        server = ("127.0.0.1", free_port())
        lazy = checkpoint_instance_lazy(orig, tmp_path / "good", source, server, leave_running=True)
        moved, daemon = restore_lazy(lazy.template, with_tls(criu, certs.node("n2")),
                                     tmp_path / "run-good", server, instance_id="moved")
        assert ask(moved, "/inc")["count"] == 3 and ask(moved, "/sum")["sum"] == checksum
        assert daemon.wait(60) == 0
        lazy.wait(60)
    finally:
        for inst in (moved, orig):
            if inst is not None:
                inst.kill(grace=0)
                inst.close()
        if daemon is not None:
            daemon.kill()
