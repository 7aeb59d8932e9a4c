"""Lazy (post-copy) restores.

Migration of a running copy on one machine: the dump writes only the small images and serves the
memory from a page server; the target restores at once and gets its pages on demand. The copy's
memory state continues; a failed lazy restore ends by its deadline and the source copy keeps running.

Lazy templates (`[restore] method = "lazy"`, here jvm-app and node-app with the method overridden
at test time): the build records a working set, copies restore lazily from the local image with
that set fetched first and answer correctly, the lazy-pages daemon ends once every page is in; a
daemon killed mid-restore or a corrupt working set is a typed error that leaves nothing behind."""
from __future__ import annotations

import dataclasses
import json
import socket
import time
from pathlib import Path

import psutil
import pytest

from pool.cli.demo import PROBES
from pool.copies import restore_chain
from pool.copies.fork import checkpoint_instance_lazy, restore_lazy
from pool.copies.restore import Identity, Restorer
from pool.cr import netns
from pool.errors import RestoreError, TemplateCorrupt
from pool.templates import workingset
from pool.templates.build import build
from pool.templates.spec import load_spec

COUNTER = Path(__file__).resolve().parents[1] / "apps" / "counter"
TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
PIPE_MAX = Path("/proc/sys/fs/pipe-max-size")
LAZY_PIPE_MAX = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def pipe_max_size():
    """criu-notes: CRIU cannot grow its pipes here, so lazy pages need fs.pipe-max-size >= 4 MiB."""
    old = PIPE_MAX.read_text().strip()
    if int(old) < LAZY_PIPE_MAX:
        PIPE_MAX.write_text(str(LAZY_PIPE_MAX))
    yield
    PIPE_MAX.write_text(old)


@pytest.fixture(scope="module")
def counter_big(session_store, criu):
    spec = load_spec(COUNTER)
    spec = dataclasses.replace(spec, name="counter-big", env=spec.env + (("BALLAST_MB", "64"),))
    return build(spec, session_store, criu).template


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(inst, path: str = "/") -> dict:
    status, body = netns.http_in(inst.netns_fd, f"http://127.0.0.1:8080{path}", timeout=20)
    assert status == 200
    return json.loads(body)


def test_lazy_migration_continues_the_state(pipe_max_size, counter_big, criu, restorer, tmp_path):
    orig = restorer.spawn("counter-big", Identity("source"))
    moved = daemon = lazy = None
    try:
        for _ in range(3):
            ask(orig, "/inc")
        checksum = ask(orig, "/sum")["sum"]
        server = ("127.0.0.1", free_port())
        lazy = checkpoint_instance_lazy(orig, tmp_path / "build", criu, server)
        shipped = lazy.template.image_bytes
        assert shipped < counter_big.image_bytes / 4  # the memory stays behind, served on demand
        lazy.template.verify(full=True)

        t0 = time.monotonic()
        moved, daemon = restore_lazy(lazy.template, criu, tmp_path / "run-moved", server,
                                     instance_id="moved")
        assert ask(moved, "/inc")["count"] == 4          # continues from the source's state
        first_answer = time.monotonic() - t0
        assert ask(moved, "/sum")["sum"] == checksum      # every page arrived intact
        assert daemon.wait(60) == 0                       # all pages in: the daemon is done
        lazy.wait(60)                                     # and the source's page server too
        assert orig.wait(10) is not None                  # the source copy is gone (migrated)
        assert ask(moved)["count"] == 4
        print(f"lazy restore: first answer {first_answer * 1000:.0f} ms, images shipped "
              f"{shipped / 2**20:.1f} MB of {counter_big.image_bytes / 2**20:.0f} MB")
    finally:
        for inst in (moved, orig):
            if inst is not None:
                inst.kill(grace=0)
                inst.close()
        if daemon is not None:
            daemon.kill()
        if lazy is not None:
            lazy.abort()


def test_failed_lazy_restore_ends_by_deadline_and_the_source_runs_on(pipe_max_size, counter_big,
                                                                     criu, restorer, tmp_path):
    orig = restorer.spawn("counter-big", Identity("source2"))
    try:
        ask(orig, "/inc")
        server = ("127.0.0.1", free_port())
        lazy = checkpoint_instance_lazy(orig, tmp_path / "build", criu, server)
        lazy.abort()  # the page server dies before the target asked for a single page
        t0 = time.monotonic()
        with pytest.raises(RestoreError):
            moved, daemon = restore_lazy(lazy.template, criu, tmp_path / "run-moved", server,
                                         instance_id="never", timeout=8)
            try:  # if CRIU got as far as a process, it must not answer: its memory is missing
                ask(moved)
            finally:
                moved.kill(grace=0)
                moved.close()
                daemon.kill()
        assert time.monotonic() - t0 < 20
        assert not (tmp_path / "run-moved").exists()
        assert ask(orig, "/inc")["count"] == 2  # the source was resumed when its CRIU died
    finally:
        orig.kill(grace=0)
        orig.close()


# --- lazy templates: the working set recorded at build time, fetched first at restore ----------------
def lazy_variant(base: str):
    """The template `base` with [restore] method = "lazy", named BASE-lazy (a test-time override)."""
    spec = load_spec(TEMPLATES / base)
    return dataclasses.replace(spec, name=f"{base}-lazy",
                               restore=dataclasses.replace(spec.restore, method="lazy"))


@pytest.fixture(scope="module")
def lazy_templates(pipe_max_size, session_store, criu):
    built = {}

    def get(base: str):
        if base not in built:
            built[base] = build(lazy_variant(base), session_store, criu).template
        return built[base]
    return get


def first_answer(inst, base: str) -> dict:
    probe = PROBES[base]
    status, body = netns.http_in(inst.netns_fd, f"http://127.0.0.1:8080{probe.path}",
                                 method=probe.method, body=probe.body, timeout=60)
    assert status == 200, body[:300]
    answer = json.loads(body)
    assert probe.check(answer), answer
    return answer


def lazy_daemons() -> list[int]:
    """Our lazy-pages daemons, running or exited but not yet reaped."""
    found = []
    for p in psutil.Process().children():
        try:
            if "lazy-pages" in p.cmdline():
                found.append(p.pid)
        except psutil.ZombieProcess:
            if p.name() == "criu":
                found.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_daemons_gone(timeout: float = 60) -> None:
    """The daemon exits once every page is in; the watcher thread reaps it."""
    deadline = time.monotonic() + timeout
    while lazy_daemons() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lazy_daemons(), "a lazy-pages daemon outlived its job"


@pytest.mark.parametrize("base", ["jvm-app", "node-app"])
def test_lazy_template_records_a_working_set_and_restores_lazily(base, lazy_templates, criu,
                                                                 session_store, tmp_path):
    template = lazy_templates(base)
    assert template.manifest.restore_method == "lazy"
    ws_file = template.image_dir / workingset.FILE
    assert workingset.FILE in template.manifest.files          # sealed like every image file
    assert ws_file.stat().st_mode & 0o777 == 0o600
    runs = workingset.read(template.image_dir, template.name)
    assert runs and sum(r.pages for r in runs) == template.manifest.extra["working_set_pages"]
    steps: list[str] = []
    restorer = Restorer(session_store, criu, tmp_path / "run",
                        on_step=lambda name, s: steps.append(name))
    copies = []
    try:
        for i in range(2):
            copies.append(restorer.spawn(template.name, Identity(f"lazy-{base}-{i}")))
            assert "fetch_working_set" in steps and "watch_lazy_pages" in steps
            first_answer(copies[-1], base)
        wait_daemons_gone()
        for inst in copies:                     # every page arrived: they still answer right
            first_answer(inst, base)
    finally:
        for inst in copies:
            inst.kill(grace=0)
            inst.close()
    template.verify(full=True)                   # restores only read the template


def test_a_daemon_killed_mid_restore_is_a_typed_error_and_leaves_nothing(lazy_templates, criu,
                                                                         tmp_path):
    template = lazy_templates("jvm-app")

    def kill_the_daemon(job):
        job.lazy_pages.proc.kill()
        job.lazy_pages.proc.wait()

    steps = restore_chain.swap(restore_chain.LAZY_LOCAL, restore_chain.fetch_working_set,
                               kill_the_daemon, restore_chain.fetch_working_set)
    run_dir = tmp_path / "run-killed"
    job = restore_chain.RestoreJob(template=template, instance_id="unfed", run_dir=run_dir,
                                   criu=criu, working_set=workingset.read(template.image_dir,
                                                                          template.name))
    with pytest.raises(RestoreError, match="lazy-pages daemon exited"):
        restore_chain.run(job, steps)
    assert not run_dir.exists()
    assert not lazy_daemons()
    template.verify(full=True)


def test_a_corrupt_working_set_is_a_typed_error_and_leaves_nothing(lazy_templates, criu, tmp_path,
                                                                   session_store):
    template = lazy_templates("node-app")
    ws_file = template.image_dir / workingset.FILE
    original = ws_file.read_bytes()
    try:
        ws_file.write_bytes(b"x" * len(original))  # same size: only the full check sees it
        restorer = Restorer(session_store, criu, tmp_path / "run")
        with pytest.raises(TemplateCorrupt, match=workingset.FILE):
            restorer.spawn(template.name)
        # a working set that passes its checksum but not its format is refused too
        with pytest.raises(TemplateCorrupt, match="first line"):
            workingset.read(template.image_dir, template.name)
    finally:
        ws_file.write_bytes(original)
    assert not list((tmp_path / "run").glob("instances/*"))
    template.verify(full=True)
