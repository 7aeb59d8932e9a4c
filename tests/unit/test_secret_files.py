"""Reading a template's secret files (pool/node/secrets.py): owner-only regular files, clear errors."""
from __future__ import annotations

import os

import pytest

from pool.errors import SpecError
from pool.node.secrets import MAX_SECRET_BYTES, SecretEnv, read_secret


def secret(tmp_path, text: str | bytes, mode: int = 0o600, name: str = "s"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    p.chmod(mode)
    return p


def test_a_secret_is_read_with_one_trailing_newline_dropped(tmp_path):
    assert read_secret(str(secret(tmp_path, "abc\n")), "env.K") == "abc"
    assert read_secret(str(secret(tmp_path, "abc\n\n", 0o400, "t")), "env.K") == "abc\n"


@pytest.mark.parametrize("make, problem", [
    (lambda d: secret(d, "x", 0o640), "readable by others (0640); chmod 600 it"),
    (lambda d: d / "missing", "cannot read the secret file: No such file or directory"),
    (lambda d: d, "not a regular file"),
    (lambda d: secret(d, "x" * (MAX_SECRET_BYTES + 1)), "over 65536"),
    (lambda d: secret(d, b"\xff\xfe"), "not UTF-8 text"),
    (lambda d: secret(d, "a\0b"), "NUL byte"),
])
def test_a_bad_secret_file_is_a_spec_error_naming_the_field(tmp_path, make, problem):
    with pytest.raises(SpecError, match=problem.replace("(", r"\(").replace(")", r"\)")) as e:
        read_secret(str(make(tmp_path)), "env.API_KEY")
    assert e.value.field == "env.API_KEY"


def test_a_symlink_is_not_followed(tmp_path):
    target = secret(tmp_path, "x")
    os.symlink(target, tmp_path / "link")
    with pytest.raises(SpecError, match="cannot read the secret file"):
        read_secret(str(tmp_path / "link"), "env.K")


def test_values_per_template_and_a_failure_kept_until_the_next_load(tmp_path):
    env = SecretEnv()
    assert env.values("t") == {}                               # no secrets: nothing to add
    good = secret(tmp_path, "v")
    env.load("t", {"secret_env": {"K": str(good)}})
    assert env.values("t") == {"K": "v"}
    good.chmod(0o644)
    env.load("t", {"secret_env": {"K": str(good)}})
    for _ in range(2):
        with pytest.raises(SpecError, match="readable by others"):
            env.values("t")
    env.forget("t")
    assert env.values("t") == {}
