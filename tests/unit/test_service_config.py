"""The service's TOML config: defaults, overrides, and a clear error for every bad setting."""
from __future__ import annotations

from pathlib import Path

import pytest

from pool.cluster.config import load_config, read_token
from pool.cr.cgroups import Limits
from pool.errors import SpecError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "service.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.on_shutdown == "kill" and cfg.tcp is None and cfg.templates == {}
    assert cfg.defaults.max_live == 32
    assert cfg.connection_limits() == {"max_connections": 1024, "idle_timeout": 300.0}


def test_connection_limits(tmp_path):
    cfg = load_config(write(tmp_path, "[service]\nmax_connections = 16\nidle_connection_timeout = 0\n"))
    assert cfg.connection_limits() == {"max_connections": 16, "idle_timeout": None}  # 0: no limit
    assert cfg.max_log_bytes == 8 << 20 and cfg.restore_timeout == 60.0


def test_full_file_and_overrides(tmp_path):
    p = write(tmp_path, """
[service]
metrics = "127.0.0.1:9464"
on_shutdown = "leave"
max_live = 8
[templates.py-hello]
min_warm = 2
ttl = 60
[templates.other]
max_live = 4
""")
    cfg = load_config(p, socket=str(tmp_path / "s.sock"), metrics=None)
    assert cfg.metrics == ("127.0.0.1", 9464)
    assert cfg.on_shutdown == "leave"
    assert cfg.socket == tmp_path / "s.sock"
    assert cfg.templates["py-hello"].min_warm == 2 and cfg.templates["py-hello"].max_live == 8
    assert cfg.templates["py-hello"].ttl == 60.0
    assert cfg.templates["other"].max_live == 4


@pytest.mark.parametrize("text,field,problem", [
    ("[servic]\n", "servic", "did you mean 'service'"),
    ("[service]\non_shutdown = \"drop\"\n", "service.on_shutdown", "expected one of"),
    ("[service]\nmetrics = \"9464\"\n", "service.metrics", "HOST:PORT"),
    ("[service]\nmax_live = 0\n", "service.max_live", "at least 1"),
    ("[service]\nmax_connections = 0\n", "service.max_connections", "at least 1"),
    ("[service]\nidle_connection_timeout = -1\n", "service.idle_connection_timeout", "0 or more"),
    ("[service]\ndrain_timeout = \"10\"\n", "service.drain_timeout", "expected a number, got string"),
    ("[templates.Bad_Name]\nmin_warm = 1\n", "templates.Bad_Name", "not a valid template name"),
    ("[templates.x]\nmin_warm = 5\nmax_live = 2\n", "templates.x.min_warm", "more than max_live"),
    ("[templates.x]\nwarm = 1\n", "templates.x.warm", "did you mean 'min_warm'"),
    ("[service]\ntcp = \"127.0.0.1:7070\"\n", "service.token_file", "needs authentication"),
    ("[service]\nmax_log_bytes = 100\n", "service.max_log_bytes", "at least 4096"),
    ("[service]\nrestore_timeout = 0\n", "service.restore_timeout", "more than 0"),
])
def test_bad_settings_name_the_field(tmp_path, text, field, problem):
    with pytest.raises(SpecError) as info:
        load_config(write(tmp_path, text))
    assert info.value.field == field
    assert problem in info.value.problem


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_config(write(tmp_path, "[service\n"))


def test_token_file_must_be_private_and_long(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("x" * 32)
    tok.chmod(0o644)
    with pytest.raises(SpecError, match="chmod 600"):
        read_token(tok)
    tok.chmod(0o600)
    assert read_token(tok) == "x" * 32
    tok.write_text("short")
    with pytest.raises(SpecError, match="at least 16"):
        read_token(tok)


def test_warm_copies_of_all_templates_must_fit_the_capacity(tmp_path):
    p = write(tmp_path, "[service]\ncapacity = 4\n[templates.a]\nmin_warm = 3\n"
                        "[templates.b]\nmin_warm = 2\n")
    with pytest.raises(SpecError) as e:
        load_config(p)
    assert e.value.field == "service.capacity" and "add up to 5" in e.value.problem
    assert load_config(p, capacity=5).capacity == 5


@pytest.mark.parametrize("text, size", [("16G", 16 << 30), ("512M", 512 << 20), ("1048576", 1 << 20),
                                        ("2GiB", 2 << 30), ("64k", 64 << 10), ("1T", 1 << 40)])
def test_memory_budget_is_a_size(tmp_path, text, size):
    cfg = load_config(write(tmp_path, f'[service]\nmemory_budget = "{text}"\n'))
    assert cfg.memory_budget == size and cfg.node_settings().memory_budget == size
    assert load_config(None).memory_budget is None            # no budget unless asked


@pytest.mark.parametrize("value", ['"16Q"', '"-1G"', '"0"', '"G"', '"1.5G"', "16"])
def test_a_bad_memory_budget_names_the_field(tmp_path, value):
    with pytest.raises(SpecError, match="service.memory_budget") as e:
        load_config(write(tmp_path, f"[service]\nmemory_budget = {value}\n"))
    assert e.value.data["field"] == "service.memory_budget"


def test_max_warm_is_at_most_max_live(tmp_path):
    cfg = load_config(write(tmp_path, "[templates.a]\nmin_warm = 1\nmax_warm = 4\nmax_live = 8\n"
                                      "[templates.b]\nmin_warm = 2\n[templates.c]\nmin_warm = 3\n"
                                      "max_warm = 0\n"))
    assert cfg.templates["a"].max_warm == 4 and cfg.templates["b"].max_warm is None
    assert cfg.templates["c"].max_warm == 0                   # at or below min_warm: fixed
    for bad in ("max_warm = 9\nmax_live = 8\n", "max_warm = -1\n"):
        with pytest.raises(SpecError, match="templates.a.max_warm"):
            load_config(write(tmp_path, f"[templates.a]\n{bad}"))


def test_copy_limits_defaults(tmp_path):
    assert load_config(None).copy_limits == Limits()
    cfg = load_config(write(tmp_path, '[limits]\nmemory = "1G"\ncpus = 2\npids = 512\n'))
    assert cfg.copy_limits == Limits(memory=1 << 30, cpus=2.0, pids=512)
    assert cfg.node_settings().copy_limits == cfg.copy_limits
    with pytest.raises(SpecError) as e:
        load_config(write(tmp_path, '[limits]\nmemory = "1X"\n'))
    assert e.value.field == "limits.memory"


def test_encrypt_images_and_the_key_reach_the_node(tmp_path):
    from pool.cluster.config import load_config  # noqa: PLC0415

    f = tmp_path / "pool.toml"
    f.write_text(f'[service]\nencrypt_images = true\nimage_key = "{tmp_path}/k/image.key"\n')
    cfg = load_config(f, store=str(tmp_path / "store"))
    s = cfg.node_settings()
    assert s.encrypt_images and s.image_key == tmp_path / "k" / "image.key"
    st = cfg.open_store()
    assert st.encrypted and (tmp_path / "k" / "image.key").stat().st_mode & 0o777 == 0o600
    assert not load_config(None, store=str(tmp_path / "store")).open_store().encrypted
