"""Forking a running copy: its memory state goes into a template that restores anywhere; the original
keeps running. Also the remote fork: the forked image shipped over a lab network to another store."""
from __future__ import annotations

import asyncio
import json

import pytest
from netlab import NetLab

from pool.copies.fork import checkpoint_instance
from pool.copies.restore import Identity, Restorer
from pool.cr import netns
from pool.templates import transfer
from pool.templates.compat import node_facts
from pool.templates.store import Store


def ask(inst, path: str = "/") -> dict:
    status, body = netns.http_in(inst.netns_fd, f"http://127.0.0.1:8080{path}", timeout=10)
    assert status == 200
    return json.loads(body)


@pytest.fixture
def copies():
    made = []
    yield made
    for inst in made:
        inst.kill(grace=0)
        inst.close()


def test_fork_continues_and_the_original_keeps_running(counter, session_store, criu, restorer,
                                                      copies):
    orig = restorer.spawn("counter", Identity("orig"))
    copies.append(orig)
    for _ in range(3):
        ask(orig, "/inc")
    fork = checkpoint_instance(orig, session_store, criu, name="counter-fork")
    try:
        m = fork.manifest.to_dict()
        assert m["pipes"] == {} and set(m["stdio_keys"]) == {"stdout", "stderr"}
        assert m["forked_from"] == {"template": "counter", "build_id": counter.build_id,
                                    "instance": "orig"}
        assert not m["stdio_keys"]["stdout"].startswith("/")
        assert ask(orig, "/inc")["count"] == 4          # the original was not stopped

        a = restorer.spawn("counter-fork", Identity("fork-a"))
        copies.append(a)
        b = restorer.spawn("counter-fork", Identity("fork-b"))
        copies.append(b)
        assert ask(a)["count"] == 3 and ask(b)["count"] == 3   # state as at the fork
        assert ask(a, "/inc")["count"] == 4 and ask(a, "/inc")["count"] == 5
        assert ask(b)["count"] == 3 and ask(orig)["count"] == 4  # and then each its own
        assert ask(a)["instance"] == "orig"  # a fork keeps the original's identity
        assert a.read_log("stdout") == b""   # fresh logs of its own, not the original's
        assert orig.poll() is None
    finally:
        session_store.remove("counter-fork")


def test_fork_into_a_directory(counter, criu, restorer, copies, tmp_path):
    orig = restorer.spawn("counter", Identity("orig2"))
    copies.append(orig)
    ask(orig, "/inc")
    t = checkpoint_instance(orig, tmp_path / "build", criu, source_manifest=counter.manifest)
    t.verify(full=True)
    assert t.name.startswith("counter+fork-") and t.manifest.spec["network"]["port"] == 8080
    assert (tmp_path / "build" / "manifest.json").is_file()
    with pytest.raises(FileExistsError):
        checkpoint_instance(orig, tmp_path / "build", criu)


def test_remote_fork_over_the_lab_network(counter, session_store, criu, restorer, copies,
                                          tmp_path):
    """Fork on node n1, ship the image to node n2's store over the lab network, restore there."""
    orig = restorer.spawn("counter", Identity("orig3"))
    copies.append(orig)
    for _ in range(5):
        ask(orig, "/inc")
    checkpoint_instance(orig, session_store, criu, name="counter-remote")
    there = Store(tmp_path / "node2-store")
    try:
        with NetLab(2) as lab:
            res = asyncio.run(_ship(lab, session_store, there, criu))
        assert res.files_sent == len(res.template.manifest.files)
        assert res.bytes_wire < res.bytes_raw  # compressed on the wire
        r2 = Restorer(there, criu, tmp_path / "node2-run")
        copy = r2.spawn("counter-remote", Identity("remote"))
        copies.append(copy)
        assert ask(copy)["count"] == 5
        assert ask(copy, "/inc")["count"] == 6 and ask(orig)["count"] == 5
    finally:
        session_store.remove("counter-remote")


async def _ship(lab: NetLab, src_store: Store, dst_store: Store, criu):
    """A TemplateSource listening on n1's address, fetched from inside n2."""
    listener = lab.socket("n1")
    listener.bind((lab.address("n1"), 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    source = transfer.TemplateSource(src_store, tokens={"lab-token"})
    await source.start(sock=listener)
    loop = asyncio.get_running_loop()

    async def connect():
        s = lab.socket("n2")
        s.setblocking(False)
        try:
            await loop.sock_connect(s, (lab.address("n1"), port))
        except OSError:
            s.close()
            raise
        return await asyncio.open_connection(sock=s)

    try:
        return await transfer.fetch(dst_store, "counter-remote", connect=connect,
                                    token="lab-token", facts=node_facts(criu))
    finally:
        await source.close()
