"""Secret env (`[env] KEY = { secret_file = PATH }`): never in the image nor the manifest, handed to each
copy at spawn by a real service; a secret file others can read is refused with the field named."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pool.cli.demo import PROBES, LocalService, ask
from pool.errors import SpecError
from pool.templates.build import build
from pool.templates.spec import load_spec

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def secret_template(tmp_path: Path, secret_file: Path) -> Path:
    d = tmp_path / "py-secret"
    shutil.copytree(ROOT / "templates" / "py-hello", d)
    toml = (d / "template.toml").read_text().replace(
        'GREETING = "hello from the template"', f'GREETING = {{ secret_file = "{secret_file}" }}')
    (d / "template.toml").write_text('name = "py-secret"\n' + toml)
    return d


def test_a_secret_reaches_each_copy_but_never_the_image(tmp_path, store, criu):
    value = "s3cret-" + os.urandom(8).hex()
    secret = tmp_path / "greeting.secret"
    secret.write_text(value + "\n")
    secret.chmod(0o600)
    spec = load_spec(secret_template(tmp_path, secret))
    assert spec.env_dict.get("GREETING") is None and dict(spec.secret_env) == {"GREETING": str(secret)}
    t = build(spec, store, criu).template
    for f in t.build_dir.rglob("*"):                      # the image, the manifest, everything kept
        assert not f.is_file() or value.encode() not in f.read_bytes(), f

    (tmp_path / "a").mkdir()
    with LocalService(store.root, tmp_path / "a", "[templates.py-secret]\nmin_warm = 1\n") as svc, \
            svc.client() as c:
        svc.wait_warm("py-secret", 1)
        inst = c.spawn("py-secret")
        assert ask(inst.address, PROBES["py-hello"])["greeting"] == value
        assert c.info(inst.id)["env_keys"] == ["GREETING"]
        overridden = c.spawn("py-secret", env={"GREETING": "mine"})   # a client's env wins
        assert ask(overridden.address, PROBES["py-hello"])["greeting"] == "mine"
        assert value not in repr(c.list()) + repr(c.templates())
        inst.kill(grace=0)
        overridden.kill(grace=0)

    # a secret others can read: spawns of that template fail, naming the field; the service lives on
    secret.chmod(0o644)
    (tmp_path / "b").mkdir()
    with LocalService(store.root, tmp_path / "b") as svc, svc.client() as c:
        for _ in range(2):  # refused each time, at once: nothing to quarantine
            with pytest.raises(SpecError, match="readable by others") as e:
                c.spawn("py-secret")
            assert e.value.data["field"] == "env.GREETING"
        assert c.stats()["templates"]["py-secret"]["quarantined"] is False
