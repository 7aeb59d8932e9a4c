"""The one error taxonomy (pool.errors): unique codes, every class rebuilt from the wire as itself,
the families callers catch, the table in the module's docstring. (Whose fault each is: test_warm.)"""
import asyncio

import pytest

from pool import errors
from pool.errors import NodeUnavailable, NoReply, PoolError, PoolTimeout, ShuttingDown

CLASSES = [PoolError, *errors._all_subclasses(PoolError)]


def test_every_class_has_its_own_code():
    codes = [cls.code for cls in CLASSES]
    assert len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)


@pytest.mark.parametrize("cls", CLASSES[1:], ids=lambda c: c.__name__)
def test_every_class_is_rebuilt_from_the_wire_as_itself(cls):
    exc = errors.from_wire({"code": cls.code, "message": "it went wrong", "data": {"node": "n1"}})
    assert type(exc) is cls
    assert (exc.message, exc.data, str(exc).splitlines()[0]) == ("it went wrong", {"node": "n1"},
                                                                 "it went wrong")


def test_an_unknown_code_is_a_remote_error_keeping_the_code():
    exc = errors.from_wire({"code": "from_the_future", "message": "m", "data": {}})
    assert type(exc) is errors.RemoteError and exc.code == "from_the_future"


def test_the_docstring_table_lists_every_class_with_its_code():
    rows = [line for line in errors.__doc__.splitlines() if line.startswith("| ")]
    for cls in CLASSES:
        if cls is errors.RemoteError:  # its code is the peer's
            continue
        assert any(r.split("|")[1].strip().split("(")[0].strip() == cls.__name__
                   and r.split("|")[2].strip() == cls.code for r in rows), cls.__name__


def test_timeouts_are_timeout_errors_and_shutting_down_is_node_unavailable():
    with pytest.raises(TimeoutError):
        raise PoolTimeout("no copy was ready within 1 s", template="t", timeout=1.0)
    with pytest.raises(asyncio.TimeoutError):
        raise NoReply("ping got no reply within 1 s", method="ping", timeout=1.0)
    with pytest.raises(NodeUnavailable):
        raise ShuttingDown("node n1 is shutting down", node="n1")
    rebuilt = errors.from_wire(PoolTimeout("slow", template="t").to_wire())
    assert isinstance(rebuilt, TimeoutError) and rebuilt.data == {"template": "t"}


def test_pool_exports_every_error_class():
    import pool
    from pool import errors

    classes = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.PoolError)}
    assert classes <= set(pool.__all__)
    assert all(getattr(pool, n) is getattr(errors, n) for n in classes)
