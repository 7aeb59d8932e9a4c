"""pool.templates.spec: parsing, defaults, every validation rule (with the field it names), digest, lookup."""
from __future__ import annotations

import dataclasses
import json
import textwrap
import tomllib
from pathlib import Path

import pytest

from pool.errors import SpecError, TemplateNotFound
from pool.templates.spec import HOST_MODE_PROBLEM, Ready, find_template_dir, load_spec

MIN = 'command = ["python", "app.py"]\n[ready]\nsdk = true\n'


def write(tmp_path: Path, text: str, folder: str = "web") -> Path:
    d = tmp_path / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / "template.toml").write_text(textwrap.dedent(text))
    return d


def fails(tmp_path: Path, text: str) -> SpecError:
    with pytest.raises(SpecError) as ei:
        load_spec(write(tmp_path, text))
    return ei.value


FULL = """
    name = "web-app.v2"
    description = "a web app"
    command = ["python", "-m", "http.server", "8080"]
    cwd = "src"

    [env]
    B = "2"
    A = "1"

    [ready]
    http = "http://127.0.0.1:8080/health"
    timeout = 30
    interval = 0.1

    [warmup]
    http = ["http://localhost:8080/", "http://127.0.0.1:8080/x"]
    repeat = 3
    timeout = 2.5
    method = "POST"
    body = "{}"

    [network]
    mode = "isolated"
    port = 8080

    [checkpoint]
    tcp_close = true
    ghost_limit = 1048576

    [restore]
    hostname = "web-{id}"
"""


# --- valid specs ---------------------------------------------------------------------------------------
def test_full_spec(tmp_path):
    d = write(tmp_path, FULL)
    (d / "src").mkdir()
    s = load_spec(d)
    assert s.name == "web-app.v2"
    assert s.dir == d.resolve() and s.path == d.resolve() / "template.toml"
    assert s.command == ("python", "-m", "http.server", "8080")
    assert s.cwd == (d / "src").resolve() and s.cwd.is_absolute()
    assert s.env == (("A", "1"), ("B", "2")) and s.env_dict == {"A": "1", "B": "2"}
    assert s.description == "a web app"
    assert s.ready == Ready("http", "http://127.0.0.1:8080/health", 30.0, 0.1)
    assert isinstance(s.ready.timeout, float)
    assert s.warmup.urls == ("http://localhost:8080/", "http://127.0.0.1:8080/x")
    assert (s.warmup.repeat, s.warmup.timeout, s.warmup.method, s.warmup.body) == (3, 2.5, "POST", "{}")
    assert (s.network.mode, s.network.port) == ("isolated", 8080)
    assert (s.checkpoint.tcp_close, s.checkpoint.ghost_limit) == (True, 1048576)
    assert s.restore.hostname == "web-{id}" and s.restore.identity_timeout == 10.0
    assert not s.sdk
    d2 = s.to_dict()
    assert json.loads(json.dumps(d2)) == d2
    assert d2["cwd"] == str(s.cwd) and d2["env"] == {"A": "1", "B": "2"} and d2["digest"] == s.digest


def test_minimal_spec_defaults(tmp_path):
    d = write(tmp_path, MIN)
    s = load_spec(d)
    assert s.name == "web" and s.cwd == d.resolve() and s.env == () and s.description == ""
    assert s.ready == Ready("sdk", True, 120.0, 0.05) and s.sdk
    assert s.warmup is None
    assert (s.network.mode, s.network.port) == ("none", None)
    assert (s.checkpoint.tcp_close, s.checkpoint.ghost_limit) == (False, None)
    assert (s.restore.identity_timeout, s.restore.hostname, s.restore.method) == (10.0, None, "criu")
    assert "method" not in s.to_dict()["restore"]  # the default keeps older templates' digests
    assert len(s.digest) == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "x"


def test_toml_path_same_as_folder(tmp_path):
    d = write(tmp_path, MIN)
    assert load_spec(d / "template.toml") == load_spec(str(d))


@pytest.mark.parametrize("ready,mode,value", [
    ("sdk = true", "sdk", True),
    ("tcp = 5432", "tcp", 5432),
    ('http = "http://localhost/"', "http", "http://localhost/"),
    ('stdout = "listening on \\\\d+"', "stdout", r"listening on \d+"),
    ("delay = 2", "delay", 2.0),
    ("delay = 0.5", "delay", 0.5),
])
def test_ready_modes(tmp_path, ready, mode, value):
    s = load_spec(write(tmp_path, f'command = ["x"]\n[ready]\n{ready}\n'))
    assert (s.ready.mode, s.ready.value) == (mode, value)
    assert type(s.ready.value) is type(value)


def test_secret_env_names_a_file_and_is_kept_apart(tmp_path):
    d = write(tmp_path, MIN + '[env]\nMODE = "fast"\nAPI_KEY = { secret_file = "../key" }\n')
    s = load_spec(d)
    assert s.env == (("MODE", "fast"),)                        # what the app boots with
    assert s.secret_env == (("API_KEY", str((d / "../key").resolve())),)
    assert s.to_dict()["secret_env"] == {"API_KEY": str((d / "../key").resolve())}
    assert "secret_env" not in load_spec(write(tmp_path, MIN, "plain")).to_dict()


def test_absolute_cwd_and_identity_timeout(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    s = load_spec(write(tmp_path, f'command = ["x"]\ncwd = "{other}"\n[ready]\nsdk = true\n'
                                  '[restore]\nidentity_timeout = 3\n'))
    assert s.cwd == other.resolve() and s.restore.identity_timeout == 3.0


def test_isolated_tcp_matching_port(tmp_path):
    s = load_spec(write(tmp_path, 'command = ["x"]\n[ready]\ntcp = 80\n[network]\nmode = "isolated"\nport = 80\n'))
    assert s.network.port == 80


def test_isolated_http_default_port_80(tmp_path):
    s = load_spec(write(tmp_path, 'command = ["x"]\n[ready]\nhttp = "http://localhost/"\n'
                                  '[network]\nmode = "isolated"\nport = 80\n'))
    assert s.ready.mode == "http"


# --- file-level errors ----------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as ei:
        load_spec(tmp_path)
    assert ei.value.field is None and ei.value.problem == "no template.toml here"
    assert ei.value.path == str(tmp_path.resolve())


def test_bad_toml(tmp_path):
    e = fails(tmp_path, 'command = ["x"\n')
    assert e.field is None and e.problem.startswith("not valid TOML: ")
    assert isinstance(e.__cause__, tomllib.TOMLDecodeError)
    assert e.path.endswith("template.toml")


# --- field errors: (toml, field, words in the problem) ----------------------------------------------------
R = "[ready]\nsdk = true\n"
C = 'command = ["x"]\n'
CASES = [
    # name
    (C + 'name = "Web"\n' + R, "name", "not a valid name"),
    (C + 'name = ".web"\n' + R, "name", "not a valid name"),
    (C + "name = 3\n" + R, "name", "expected a string, got int"),
    (C + 'name = "' + "a" * 64 + '"\n' + R, "name", "not a valid name"),
    # command
    (R, "command", "required"),
    ('command = "python app.py"\n' + R, "command", 'use a list: command = ["python", "app.py"]'),
    ("command = []\n" + R, "command", "must not be empty"),
    ('command = ["python", ""]\n' + R, "command", "item 1 is an empty string"),
    ('command = ["python", 1]\n' + R, "command", "expected a list of strings, got a list containing int"),
    ("command = 5\n" + R, "command", "expected a list of strings, got int"),
    # cwd / description
    (C + 'cwd = "nope"\n' + R, "cwd", "does not exist"),
    (C + 'cwd = "template.toml"\n' + R, "cwd", "is not a directory"),
    (C + "cwd = 1\n" + R, "cwd", "expected a string, got int"),
    (C + "description = true\n" + R, "description", "expected a string, got bool"),
    # env
    (C + "[env]\nPORT = 8080\n" + R, "env.PORT", "expected a string, got int"),
    (C + '[env]\n"A=B" = "x"\n' + R, "env.A=B", "not a valid environment variable"),
    (C + 'env = "x"\n' + R, "env", "expected a table, got string"),
    # ready
    (C, "ready", "missing [ready] table"),
    (C + "ready = 5\n", "ready", "expected a table, got int"),
    (C + "[ready]\ntimeout = 5\n", "ready", "got none"),
    (C + '[ready]\ntcp = 80\nhttp = "http://localhost/"\n', "ready", "got tcp, http"),
    (C + "[ready]\nsdk = false\n", "ready.sdk", "set sdk = true"),
    (C + "[ready]\nsdk = 1\n", "ready.sdk", "expected true or false, got int"),
    (C + "[ready]\ntcp = true\n", "ready.tcp", "expected an integer, got bool"),
    (C + "[ready]\ntcp = 80.0\n", "ready.tcp", "expected an integer, got float"),
    (C + "[ready]\ntcp = 0\n", "ready.tcp", "1..65535"),
    (C + "[ready]\ntcp = 65536\n", "ready.tcp", "1..65535"),
    (C + '[ready]\nhttp = "https://127.0.0.1/"\n', "ready.http", "http:// URL"),
    (C + '[ready]\nhttp = "127.0.0.1:80"\n', "ready.http", "http:// URL"),
    (C + '[ready]\nhttp = "http://example.com/"\n', "ready.http", "127.0.0.1 or localhost"),
    (C + '[ready]\nhttp = "http://127.0.0.1:99999/"\n', "ready.http", "not a valid URL"),
    (C + '[ready]\nstdout = "ready ("\n', "ready.stdout", "not a valid regular expression: missing )"),
    (C + '[ready]\nstdout = ""\n', "ready.stdout", "must not be empty"),
    (C + "[ready]\ndelay = 0\n", "ready.delay", "greater than 0"),
    (C + '[ready]\ndelay = "1"\n', "ready.delay", "expected a number, got string"),
    (C + "[ready]\nsdk = true\ntimeout = 0\n", "ready.timeout", "greater than 0"),
    (C + "[ready]\nsdk = true\ntimeout = nan\n", "ready.timeout", "greater than 0"),
    (C + "[ready]\nsdk = true\ntimeout = true\n", "ready.timeout", "expected a number, got bool"),
    (C + "[ready]\nsdk = true\ninterval = -1\n", "ready.interval", "greater than 0"),
    # warmup
    (C + R + "[warmup]\nrepeat = 2\n", "warmup.http", "required"),
    (C + R + "[warmup]\nhttp = []\n", "warmup.http", "at least one URL"),
    (C + R + '[warmup]\nhttp = "http://localhost/"\n', "warmup.http", "expected a list of strings, got string"),
    (C + R + '[warmup]\nhttp = ["http://localhost/", "http://10.0.0.1/"]\n', "warmup.http", "127.0.0.1 or localhost"),
    (C + R + '[warmup]\nhttp = ["http://localhost/"]\nrepeat = 0\n', "warmup.repeat", "at least 1"),
    (C + R + '[warmup]\nhttp = ["http://localhost/"]\nrepeat = 1.5\n', "warmup.repeat", "expected an integer, got float"),
    (C + R + '[warmup]\nhttp = ["http://localhost/"]\ntimeout = 0\n', "warmup.timeout", "greater than 0"),
    (C + R + '[warmup]\nhttp = ["http://localhost/"]\nmethod = "PUT"\n', "warmup.method", "'GET', 'POST'"),
    (C + R + '[warmup]\nhttp = ["http://localhost/"]\nbody = 1\n', "warmup.body", "expected a string, got int"),
    # network
    (C + R + '[network]\nmode = "host"\n', "network.mode", HOST_MODE_PROBLEM),
    (C + R + '[network]\nmode = "bridge"\n', "network.mode", "'none', 'isolated'"),
    (C + R + '[network]\nmode = "isolated"\n', "network.port", "required"),
    (C + R + "[network]\nport = 80\n", "network.port", 'only used with mode = "isolated"'),
    (C + R + '[network]\nmode = "isolated"\nport = 0\n', "network.port", "1..65535"),
    (C + R + '[network]\nmode = "isolated"\nport = true\n', "network.port", "expected an integer, got bool"),
    (C + '[ready]\ntcp = 81\n[network]\nmode = "isolated"\nport = 80\n', "ready.tcp", "probes port 81"),
    (C + '[ready]\nhttp = "http://localhost:81/"\n[network]\nmode = "isolated"\nport = 80\n',
     "ready.http", "probes port 81"),
    # checkpoint
    (C + R + '[checkpoint]\ntcp_close = "yes"\n', "checkpoint.tcp_close", "expected true or false, got string"),
    (C + R + "[checkpoint]\ntcp_close = 1\n", "checkpoint.tcp_close", "expected true or false, got int"),
    (C + R + "[checkpoint]\nghost_limit = -1\n", "checkpoint.ghost_limit", "at least 0"),
    (C + R + '[checkpoint]\nghost_limit = "1M"\n', "checkpoint.ghost_limit", "expected an integer, got string"),
    # restore
    (C + R + "[restore]\nidentity_timeout = 0\n", "restore.identity_timeout", "greater than 0"),
    (C + "[ready]\ntcp = 80\n[restore]\nidentity_timeout = 5\n", "restore.identity_timeout", "only used by sdk"),
    (C + R + '[restore]\nhostname = "web_{id}"\n', "restore.hostname", "may only contain"),
    (C + R + '[restore]\nhostname = "web-{name}"\n', "restore.hostname", "may only contain"),
    (C + R + '[restore]\nhostname = ""\n', "restore.hostname", "may only contain"),
    (C + R + '[restore]\nhostname = "' + "a" * 52 + '{id}"\n', "restore.hostname", "64 chars"),
    (C + R + "[restore]\nhostname = 1\n", "restore.hostname", "expected a string, got int"),
    # secret env
    (C + R + '[env]\nKEY = { secret = "x" }\n', "env.KEY.secret", "did you mean 'secret_file'"),
    (C + R + '[env]\nKEY = { secret_file = "" }\n', "env.KEY.secret_file", "must not be empty"),
    (C + '[ready]\ntcp = 80\n[env]\nKEY = { secret_file = "k" }\n', "env.KEY", "only SDK templates"),
    (C + R + '[restore]\nmethod = "clone"\n', "restore.method", "expected one of 'criu', 'fork', 'lazy'"),
    (C + "[ready]\ntcp = 80\n[restore]\nmethod = \"fork\"\n", "restore.method", "needs an SDK template"),
    # unknown keys
    ('comand = ["x"]\n' + R, "comand", "unknown key 'comand'; did you mean 'command'?"),
    (C + "[reddy]\nsdk = true\n", "reddy", "did you mean 'ready'?"),
    (C + "[ready]\nsdk = true\ntimout = 5\n", "ready.timout", "did you mean 'timeout'?"),
    (C + R + "[network]\nports = 80\n", "network.ports", "did you mean 'port'?"),
    (C + R + "[checkpoint]\nzzz = 1\n", "checkpoint.zzz", "known keys: tcp_close, ghost_limit"),
]


@pytest.mark.parametrize("text,field,words", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_field_errors(tmp_path, text, field, words):
    e = fails(tmp_path, text)
    assert e.field == field, e.message
    assert words in e.problem, e.problem
    assert e.path.endswith("template.toml") and field in e.message


def test_hostname_fits_exactly(tmp_path):
    s = load_spec(write(tmp_path, C + R + '[restore]\nhostname = "' + "a" * 51 + '{id}"\n'))
    assert s.restore.hostname.endswith("{id}")


def test_invalid_folder_name_needs_name(tmp_path):
    with pytest.raises(SpecError) as ei:
        load_spec(write(tmp_path, MIN, folder="My App"))
    assert ei.value.field == "name" and "folder name 'My App'" in ei.value.problem
    assert load_spec(write(tmp_path, 'name = "my-app"\n' + MIN, folder="My App")).name == "my-app"


def test_host_mode_message_explains():
    assert "starved" in HOST_MODE_PROBLEM and "isolated" in HOST_MODE_PROBLEM and "share" in HOST_MODE_PROBLEM


# --- digest ---------------------------------------------------------------------------------------------
def test_digest_stable_under_order_and_whitespace(tmp_path):
    d = write(tmp_path, FULL)
    (d / "src").mkdir()
    first = load_spec(d).digest
    reordered = """
        [restore]
        hostname    =   "web-{id}"
        [checkpoint]
        ghost_limit = 1_048_576
        tcp_close = true
        [network]
        port = 8080
        mode = "isolated"
        [warmup]
        body = '{}'
        method = "POST"
        timeout = 2.5
        repeat = 3
        http = [
            "http://localhost:8080/",
            "http://127.0.0.1:8080/x",   # trailing comma and comment
        ]
        [ready]
        interval = 0.1
        timeout = 30.0
        http = "http://127.0.0.1:8080/health"
        [env]
        A = "1"
        B = "2"
    """
    head = ('cwd = "src"\ncommand = [ "python", "-m", "http.server", "8080" ]\n'
            'description = "a web app"\nname = "web-app.v2"\n')
    write(tmp_path, head + textwrap.dedent(reordered))
    assert load_spec(d).digest == first


def test_digest_changes_with_a_value(tmp_path):
    d = write(tmp_path, MIN)
    first = load_spec(d).digest
    write(tmp_path, MIN + "timeout = 121\n")
    assert load_spec(d).digest != first
    write(tmp_path, MIN + "timeout = 120\n")  # the default, spelled out: same spec
    assert load_spec(d).digest == first
    write(tmp_path, 'command = ["python", "app2.py"]\n[ready]\nsdk = true\n')
    assert load_spec(d).digest != first


# --- lookup ---------------------------------------------------------------------------------------------
def test_find_template_dir(tmp_path, monkeypatch):
    store = tmp_path / "templates"
    d = write(store, MIN, folder="web")
    assert find_template_dir("web", [tmp_path / "empty", store]) == d.resolve()
    assert find_template_dir(str(d), []) == d.resolve()
    assert find_template_dir(str(d / "template.toml"), []) == d.resolve()
    monkeypatch.chdir(store)
    assert find_template_dir("./web", []) == d.resolve()
    # a local folder without a template does not shadow the search path
    (tmp_path / "other" / "web").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "other")
    assert find_template_dir("web", [store]) == d.resolve()


def test_find_template_dir_not_found(tmp_path):
    with pytest.raises(TemplateNotFound) as ei:
        find_template_dir("nope", [tmp_path])
    assert ei.value.name == "nope" and str(tmp_path) in ei.value.message
    with pytest.raises(TemplateNotFound):
        find_template_dir(str(tmp_path / "missing"), [tmp_path])


# --- [limits] and user ---------------------------------------------------------------------------------
def test_limits_and_user(tmp_path):
    s = load_spec(write(tmp_path, 'user = "nobody"\n' + MIN
                        + '[limits]\nmemory = "512M"\ncpus = 1.5\npids = 256\n'))
    assert (s.limits.memory, s.limits.cpus, s.limits.pids) == (512 << 20, 1.5, 256)
    assert (s.user.uid, s.user.gid, s.user.name) == (65534, 65534, "nobody")
    assert s.to_dict()["limits"] == {"memory": 512 << 20, "cpus": 1.5, "pids": 256}
    numeric = load_spec(write(tmp_path, 'user = "1234:5678"\n' + MIN + "[limits]\nmemory = 8388608\n",
                              "numeric"))
    assert (numeric.user.uid, numeric.user.gid, numeric.user.name) == (1234, 5678, None)
    assert numeric.limits.memory == 8 << 20 and numeric.limits.cpus is None


def test_no_limits_nor_user_keeps_the_digest_of_older_templates(tmp_path):
    s = load_spec(write(tmp_path, MIN))
    assert s.limits.to_dict() == {} and s.user is None
    assert "limits" not in s.to_dict() and "user" not in s.to_dict()


LIMIT_CASES = [
    (MIN + '[limits]\nmemory = "lots"\n', "limits.memory", "is not a size"),
    (MIN + '[limits]\nmemory = "1K"\n', "limits.memory", "at least 4M"),
    (MIN + "[limits]\nmemory = true\n", "limits.memory", "expected an integer"),
    (MIN + "[limits]\ncpus = 0\n", "limits.cpus", "greater than 0"),
    (MIN + "[limits]\ncpus = 0.001\n", "limits.cpus", "at least 0.01"),
    (MIN + "[limits]\npids = 1\n", "limits.pids", "at least 2"),
    (MIN + "[limits]\nmem = 1\n", "limits.mem", "did you mean 'memory'?"),
    ('user = "no-such-user-here"\n' + MIN, "user", "no user 'no-such-user-here'"),
    ('user = "root"\n' + MIN, "user", "is root"),
    ('user = "0:0"\n' + MIN, "user", "is root"),
]


@pytest.mark.parametrize("text,field,words", LIMIT_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(LIMIT_CASES)])
def test_limit_and_user_errors(tmp_path, text, field, words):
    e = fails(tmp_path, text)
    assert e.field == field, e.message
    assert words in e.problem, e.problem
