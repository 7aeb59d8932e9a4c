"""Which build of a template the store publishes now, read cheaply enough for every tick.

The store publishes a build by swapping STORE/NAME/current -> builds/BUILD_ID (store.py), so one
readlink(2) says which build is current: no manifest is parsed. The node compares it with what each
pool restores (node.NodeRuntime._notice_builds) to pick up a build published while it runs.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

# readlink's answers for "nothing published"; anything else (EACCES, EIO...) is raised: a node that
# cannot read its store now must not conclude the template is gone.
_NOT_PUBLISHED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EINVAL})


def current_build(store_root: Path, name: str) -> str | None:
    """The build id NAME's `current` link points to, or None if the store has no build of it."""
    try:
        return os.path.basename(os.readlink(Path(store_root) / name / "current"))
    except OSError as e:
        if e.errno in _NOT_PUBLISHED:
            return None
        raise
