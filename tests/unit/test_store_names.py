"""Names in the template store: a fork's name never collides with a template's or another fork's."""
from __future__ import annotations

import pytest

from pool import names
from pool.errors import TemplateNotFound
from pool.names import NAME_RE
from pool.templates import store

LONGEST = "a" * 63


def test_a_fork_of_the_longest_template_name_is_not_truncated_onto_the_template():
    name = names.fork_name(LONGEST)
    assert name != LONGEST and name.startswith(LONGEST + names.FORK_SEP)
    assert names.is_stored_name(name)


def test_two_forks_of_one_template_get_different_names():
    assert len({names.fork_name("py-hello") for _ in range(1000)}) == 1000


def test_no_template_can_be_named_like_a_fork():
    fork = names.fork_name("py-hello")
    assert not NAME_RE.fullmatch(fork)          # template.toml refuses it
    assert names.is_stored_name("py-hello") and names.is_stored_name(fork)


def test_malformed_fork_names_are_refused():
    for bad in ("py-hello+fork-", "py-hello+fork-XYZ", "py-hello+fork-" + "0" * 15,
                "+fork-" + "0" * 16, "py-hello+x-" + "0" * 16, "../py-hello", "Py-hello"):
        assert not names.is_stored_name(bad), bad


def test_the_store_refuses_to_publish_or_find_a_bad_name(tmp_path):
    s = store.Store(tmp_path / "store")
    with pytest.raises(TemplateNotFound):
        s.get("py-hello+fork-bad")
    with pytest.raises(TemplateNotFound):
        s.remove("../etc")
