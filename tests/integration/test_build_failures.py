"""Builds that fail (issue 3): each failure names its step, shows what the app or CRIU said last, and
rolls back completely: no process, namespace, staging directory or half-published build survives, and
an older good build of the same template stays current and restorable. Bad specs fail before anything
is started. Every case is a tiny real template built with real CRIU (about 0.3 s each)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pool.cli.main import EXIT_ERROR, main
from pool.copies.restore import Restorer
from pool.errors import BuildError, TemplateNotFound
from pool.templates.build import build
from pool.templates.spec import load_spec

NAME = "app"

# Prints its readiness line, then idles: the good build that a failed rebuild must not replace.
IDLE_APP = """
import time
print("ready", flush=True)
while True:
    time.sleep(1)
"""

# Connects to a server thread of its own on loopback (inside its network namespace) and keeps the
# connection: CRIU refuses to dump an established TCP connection unless tcp_close is set. After a
# restore (SDK templates) it reports what the copy's end of the connection does.
TCP_CLIENT_APP = """
import socket, threading, time
import pool.runtime
server = socket.create_server(("127.0.0.1", 9000))
accepted = []
threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
conn = socket.create_connection(("127.0.0.1", 9000))
while not accepted:
    time.sleep(0.01)
{ready}
for what in ("send", "recv"):
    try:
        print(what, "->", repr(conn.send(b"x") if what == "send" else conn.recv(16)), flush=True)
    except OSError as e:
        print(what, "->", e, flush=True)
while True:
    time.sleep(1)
"""


def write_template(root: Path, app: str, *, ready: str = 'stdout = "ready"',
                   command: str = '["python3", "app.py"]', extra: str = "", app_file: str = "app.py",
                   name: str = NAME) -> Path:
    """Write root/name/{template.toml, app_file}, replacing what was there: a rebuild of the same
    template name with new contents. `extra` is more TOML appended after [ready]."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / app_file).write_text(textwrap.dedent(app))
    (d / "template.toml").write_text(f'name = "{name}"\ncommand = {command}\n'
                                     f"[ready]\n{ready}\n{textwrap.dedent(extra)}")
    return d


def builds_of(store, name: str = NAME) -> set[str]:
    d = store.root / name / "builds"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def assert_rolled_back(store) -> None:
    staging = store.root / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())


def restore_once(store, criu, run_dir: Path, name: str = NAME) -> None:
    """Restore one copy, check it runs, end it: the template is usable."""
    inst = Restorer(store, criu, run_dir).spawn(name)
    try:
        assert inst.poll() is None, inst.output_tail()
    finally:
        inst.kill(grace=0)
        inst.close()


# name -> (template, step, words the problem must contain, words the output tail must contain)
FAILURES = {
    "command-not-found": (
        {"app": IDLE_APP, "command": '["no-such-command-7f3a"]'},
        "starting the app", ["command not found: 'no-such-command-7f3a'"], []),
    "exits-before-ready": (
        {"app": """
             import sys, time
             for i in range(60):
                 print(f"loading part {i}", flush=True)
             time.sleep(0.2)  # stdout and stderr are read by two threads: keep this line last
             print("config.yaml: no such file", file=sys.stderr, flush=True)
             sys.exit(3)
             """},
        "waiting for readiness", ["the app exited with status 3 before it was ready"],
        # the tail keeps the last lines, the first ones are gone
        ["loading part 59", "config.yaml: no such file"]),
    "readiness-timeout": (
        {"app": IDLE_APP, "ready": "tcp = 9009\ntimeout = 0.5"},  # nothing ever listens on 9009
        "waiting for readiness", ["tcp probe 9009 did not answer within 0.5s"], []),
    "dump-refused": (
        {"app": TCP_CLIENT_APP.format(ready='print("ready", flush=True)')},
        "checkpointing", ["CRIU refused the checkpoint", "established TCP connection", "tcp_close",
                          "--- CRIU log ---", "Connected TCP socket"],  # CRIU's own words come along
        ["ready"]),  # and the app's output
}


@pytest.mark.parametrize("prior", [False, True], ids=["first-build", "rebuild"])
@pytest.mark.parametrize("failure", FAILURES)
def test_failed_build_rolls_back(tmp_path, store, criu, failure, prior):
    template, step, problem_words, tail_words = FAILURES[failure]
    if prior:
        build(load_spec(write_template(tmp_path, IDLE_APP)), store, criu)
    before = store.get(NAME).build_id if prior else None
    builds = builds_of(store)

    with pytest.raises(BuildError) as info:
        build(load_spec(write_template(tmp_path, **template)), store, criu)
    err = info.value
    assert err.step == step, err.message
    for words in problem_words:
        assert words in err.problem, err.message
    lines = err.output_tail.splitlines()
    assert len(lines) <= 40
    for words in tail_words:
        assert any(words in ln for ln in lines), err.output_tail
    if failure == "exits-before-ready":
        assert "loading part 0" not in lines

    assert_rolled_back(store)
    assert builds_of(store) == builds  # no new build, not even a partial one
    if prior:
        assert store.get(NAME).build_id == before
        restore_once(store, criu, tmp_path / "run")
    else:
        with pytest.raises(TemplateNotFound):
            store.get(NAME)


# (template.toml lines after the command, the field the error names, words of the problem)
BAD_SPECS = [
    ('[ready]\ntcp = 8080\nhttp = "http://127.0.0.1:8080/"', "ready", "exactly one readiness mode"),
    ('[ready]\ntcp = 70000', "ready.tcp", "port number"),
    ('cwd = "missing"\n[ready]\ndelay = 1', "cwd", "does not exist"),
    ('[ready]\ndelay = 1\n[network]\nmode = "host"', "network.mode", "silently starved"),
    ('[ready]\ntcp = 8080\n[network]\nmode = "isolated"\nport = 9090', "ready.tcp", "must be the same"),
    ('[ready]\ndelay = 1\n[checkpoint]\ntcp_closed = true', "checkpoint.tcp_closed", "did you mean 'tcp_close'"),
]


@pytest.mark.parametrize("body,field,words", BAD_SPECS, ids=[f for _, f, _ in BAD_SPECS])
def test_bad_spec_is_rejected_before_anything_starts(tmp_path, capsys, body, field, words):
    d = tmp_path / NAME
    d.mkdir()
    # If the app ever ran it would leave this mark; the leak fixture sees any process or netns.
    (d / "app.py").write_text("open('started', 'w').close()\n")
    (d / "template.toml").write_text(f'command = ["python3", "app.py"]\n{body}\n')
    store = tmp_path / "store"
    # the whole `pool build` path, in this process, so that a started child would be ours
    assert main(["--store", str(store), "build", str(d)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"template.toml: {field}: " in err and words in err, err
    assert not (d / "started").exists()
    assert not store.exists()  # not even the store was created
