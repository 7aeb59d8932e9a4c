"""Secret env of templates: `[env] KEY = { secret_file = "PATH" }`, read by the node, handed to copies.

A secret never reaches the image (the build boots the app without it) nor the manifest (which names
only the file); the node reads the files when it notices a build and hands the values to each copy
at spawn in its identity, as if the client had passed them (a client's own env wins over them).
A file must be a regular file readable by its owner only (0600 or 0400), like the token file; a
changed file takes effect at the next build of the template or the next start of the node.
Reading happens when a build is noticed, never on a spawn's path; a secret that cannot be read makes
that template's spawns fail with the SpecError naming the field, until it is fixed and rebuilt.
"""
from __future__ import annotations

import os
import stat
from typing import Any, Mapping

from pool.errors import SpecError

MAX_SECRET_BYTES = 64 * 1024


def read_secret(path: str, field: str) -> str:
    """One secret file's value (one trailing newline dropped)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise SpecError(path, field, f"cannot read the secret file: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(path, field, "the secret file is not a regular file")
        if st.st_mode & 0o077:
            raise SpecError(path, field, f"the secret file is readable by others "
                                         f"({stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        if st.st_size > MAX_SECRET_BYTES:
            raise SpecError(path, field, f"the secret file has {st.st_size} bytes, over "
                                         f"{MAX_SECRET_BYTES}")
        raw = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    try:
        value = raw.decode()
    except UnicodeDecodeError as e:
        raise SpecError(path, field, "the secret file is not UTF-8 text") from e
    value = value[:-1] if value.endswith("\n") else value
    if "\0" in value:
        raise SpecError(path, field, "the secret contains a NUL byte")
    return value


class SecretEnv:
    """Each template's secret env values, as of its current build."""

    def __init__(self) -> None:
        self._values: dict[str, dict[str, str] | SpecError] = {}

    def load(self, template: str, spec: Mapping[str, Any]) -> None:
        """Read the secret files a build's spec names (spec: Manifest.spec)."""
        files = spec.get("secret_env") or {}
        try:
            self._values[template] = {k: read_secret(str(p), f"env.{k}") for k, p in files.items()}
        except SpecError as e:
            self._values[template] = e

    def forget(self, template: str) -> None:
        self._values.pop(template, None)

    def values(self, template: str) -> dict[str, str]:
        """The secrets to hand to a copy of template; the SpecError if they could not be read."""
        got = self._values.get(template, {})
        if isinstance(got, SpecError):
            raise got
        return got
