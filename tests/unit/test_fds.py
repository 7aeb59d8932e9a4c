"""pool.fds: the open-files limit is raised, and fds past select()'s FD_SETSIZE can be waited on."""
import os
import resource

from pool import fds


def test_raise_nofile_limit_lifts_the_soft_limit_to_the_hard_one():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, before[1]), before[1]))
        assert fds.raise_nofile_limit() == (before[1], before[1])
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (before[1], before[1])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_readable_works_past_fd_setsize():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, _ = fds.raise_nofile_limit()
    assert soft > 2048, "this test needs an open-files limit above 2048"
    r, w = os.pipe()
    high_r = os.dup2(r, 2000)  # select() would raise ValueError for this one
    try:
        assert not fds.readable(high_r, 0)
        os.write(w, b"x")
        assert fds.readable(high_r, 1.0)
        os.close(w)
        w = -1
        os.read(high_r, 1)
        assert fds.readable(high_r, 0)  # hung up counts: a read will not block
    finally:
        for fd in (r, high_r, w):
            if fd >= 0:
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
