"""The template store: atomic publish, manifests, integrity, private permissions.

Layout (everything 0700 dirs / 0600 files: images hold process memory, secrets included):

    STORE/NAME/current -> builds/BUILD_ID     swapped atomically by rename(2) of a new symlink
    STORE/NAME/builds/BUILD_ID/manifest.json
    STORE/NAME/builds/BUILD_ID/image/*.img    CRIU images + cpuinfo.img
    STORE/.staging/...                        builds in progress; never read by restores

A build stages into .staging and becomes visible only by the symlink swap, so a restore sees either
the old complete template or the new complete one. One previous build is kept, because a restore
that started before the swap may still be reading it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from pool.errors import TemplateCorrupt, TemplateNotFound
from pool.names import is_stored_name
from pool.templates.manifest import FORMAT, MANIFEST, ImageFile, Manifest, valid_build_id

KEEP_PREVIOUS = 1
_NOT_PUBLISHED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EINVAL})  # readlink: no build


def sha256_file(path: Path, h: Any = None) -> Any:
    """The sha256 of a file's bytes, as a hashlib object (h: one to go on from, for a resumed
    file); .hexdigest() is what manifests hold."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h


@dataclass(frozen=True)
class Template:
    """A published template: its manifest and where its image is."""

    name: str
    build_dir: Path
    manifest: Manifest

    @property
    def image_dir(self) -> Path:
        return self.build_dir / "image"

    @property
    def build_id(self) -> str:
        return self.manifest.build_id

    @property
    def image_bytes(self) -> int:
        return self.manifest.image_bytes

    def verify(self, full: bool = True) -> None:
        """Check every image file against the manifest: sizes always, sha256 when full."""
        files = self.manifest.files
        present = {p.name for p in self.image_dir.iterdir()} if self.image_dir.is_dir() else set()
        missing = sorted(set(files) - present)
        if missing:
            raise TemplateCorrupt(self.name, f"image file missing: {missing[0]}")
        extra = sorted(present - set(files))
        if extra:
            raise TemplateCorrupt(self.name, f"unexpected file in image: {extra[0]}")
        for rel, meta in files.items():
            path = self.image_dir / rel
            size = path.stat().st_size
            if size != meta.size:
                raise TemplateCorrupt(self.name, f"{rel} is {size} bytes, manifest says {meta.size}")
            if full and sha256_file(path).hexdigest() != meta.sha256:
                raise TemplateCorrupt(self.name, f"{rel} does not match its sha256 in the manifest")


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    # -- reading -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if is_stored_name(p.name) and (p / "current").is_symlink())

    def get(self, name: str) -> Template:
        link = self.root / name / "current"
        if not is_stored_name(name) or not link.is_symlink():
            raise TemplateNotFound(name, where=str(self.root))
        build_dir = link.resolve()  # pin this build: a later swap does not move us
        try:
            raw = json.loads((build_dir / MANIFEST).read_text())
        except FileNotFoundError as e:
            raise TemplateCorrupt(name, f"no {MANIFEST} in {build_dir}") from e
        except json.JSONDecodeError as e:
            raise TemplateCorrupt(name, f"{MANIFEST} is not valid JSON: {e.msg}") from e
        return Template(name=name, build_dir=build_dir, manifest=Manifest.from_dict(raw, name))

    def current_build_id(self, name: str) -> str | None:
        """The build id NAME's `current` link points to, or None if nothing is published: one
        readlink(2), no manifest parsed, cheap enough for every tick of a node. Errors other than
        "not published" (EACCES, EIO) are raised: an unreadable store is not an empty one."""
        try:
            return os.path.basename(os.readlink(self.root / name / "current"))
        except OSError as e:
            if e.errno in _NOT_PUBLISHED:
                return None
            raise

    def all(self) -> Iterator[Template]:
        for name in self.names():
            with contextlib.suppress(TemplateNotFound, TemplateCorrupt):
                yield self.get(name)

    # -- writing -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A private directory to build into; removed on exit unless it was published."""
        self._ensure_root()
        staging_root = self.root / ".staging"
        staging_root.mkdir(exist_ok=True, mode=0o700)
        path = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=staging_root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish(self, name: str, staged: Path, facts: Mapping[str, Any]) -> Template:
        """Seal staged (see seal()) and make it NAME's current build atomically."""
        template = seal(staged, name, facts)
        return self._install(name, staged, template.manifest.build_id)

    def publish_received(self, name: str, staged: Path, manifest: Manifest) -> Template:
        """Publish a build made on another node, keeping its build_id and manifest as they are.

        staged/image must hold exactly the manifest's files, each matching its size and sha256
        (TemplateCorrupt otherwise, and nothing is published). If that build is already here it
        is reused: publishing the same build twice is harmless.
        """
        if manifest.name != name:
            raise TemplateCorrupt(name, f"{MANIFEST}: name is {manifest.name!r}, expected {name!r}")
        received = Template(name=name, build_dir=staged, manifest=manifest)
        received.verify(full=True)
        final = self.root / name / "builds" / manifest.build_id
        if final.is_dir():
            try:
                Template(name=name, build_dir=final, manifest=manifest).verify(full=True)
            except TemplateCorrupt:
                shutil.rmtree(final, ignore_errors=True)  # a damaged leftover: replace it
            else:
                shutil.rmtree(staged, ignore_errors=True)
                return self._swap(name, final)
        for p in (staged / "image").iterdir():
            os.chmod(p, 0o600)
        write_manifest(staged, manifest)
        return self._install(name, staged, manifest.build_id)

    def _install(self, name: str, staged: Path, build_id: str) -> Template:
        """Sync the sealed build staged, move it into builds/ and swap `current` to it."""
        for d in (staged, staged / "image"):
            os.chmod(d, 0o700)
        _fsync_tree(staged)

        tdir = self.root / name
        builds = tdir / "builds"
        builds.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(tdir, 0o700)
        final = builds / build_id
        os.rename(staged, final)
        return self._swap(name, final)

    def _swap(self, name: str, final: Path) -> Template:
        tdir = self.root / name
        tmp_link = tdir / f".current.{os.getpid()}.{time.monotonic_ns()}"
        os.symlink(Path("builds") / final.name, tmp_link)
        os.rename(tmp_link, tdir / "current")  # the point of publication
        _fsync_dir(tdir)
        self._prune(tdir, keep=final.name)
        return self.get(name)

    # -- receiving from another node (pool/templates/transfer.py) ---------------------------------------------
    def partial_dir(self, name: str, build_id: str) -> Path:
        """A directory that keeps a build being received across interrupted transfers.

        Laid out like a build dir (image/ only); restores never look here. Only files verified
        against the sender's manifest carry their final name; the file in flight ends in .part.
        Partial dirs of other builds of NAME are dropped: they can no longer be completed.
        """
        if not is_stored_name(name) or not valid_build_id(build_id):
            raise ValueError(f"bad template name {name!r} or build id {build_id!r}")
        self._ensure_root()
        root = self.root / ".partial"
        root.mkdir(exist_ok=True, mode=0o700)
        for old in root.glob(f"{name}@*"):  # '@' is in neither names nor build ids
            if old.name != f"{name}@{build_id}" and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        path = root / f"{name}@{build_id}"
        (path / "image").mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def remove(self, name: str) -> None:
        tdir = self.root / name
        if not is_stored_name(name) or not (tdir / "current").is_symlink():
            raise TemplateNotFound(name, where=str(self.root))
        # Unpublish first (atomic), then delete the files.
        os.unlink(tdir / "current")
        shutil.rmtree(tdir, ignore_errors=True)

    def _prune(self, tdir: Path, keep: str) -> None:
        builds = sorted((p for p in (tdir / "builds").iterdir() if p.name != keep),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in builds[KEEP_PREVIOUS:]:
            shutil.rmtree(old, ignore_errors=True)


def seal(build_dir: Path, name: str, facts: Mapping[str, Any]) -> Template:
    """Finish a build dir whose image/ is complete: its files made private (0600) and listed with
    size and sha256, the manifest (facts plus format, name, files, image_bytes) checked and
    written. Store.publish seals its staging dir so; a fork seals a dir it ships unpublished."""
    if not is_stored_name(name):
        raise ValueError(f"bad template name {name!r}")
    files = {}
    for p in sorted((build_dir / "image").iterdir()):
        os.chmod(p, 0o600)
        files[p.name] = ImageFile(size=p.stat().st_size, sha256=sha256_file(p).hexdigest())
    manifest = Manifest.from_dict({
        **facts, "format": FORMAT, "name": name,
        "files": {rel: f.to_dict() for rel, f in files.items()},
        "image_bytes": sum(f.size for f in files.values())}, name)
    write_manifest(build_dir, manifest)
    return Template(name=name, build_dir=build_dir, manifest=manifest)


def write_manifest(build_dir: Path, manifest: Manifest) -> None:
    """The one writer of manifest.json: private, synced."""
    _write_private(build_dir / MANIFEST, json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_problem(code: int | None) -> str:
    """A failed write into the store, as an error message says it: errno name and text, and what to
    do when the disk (or the quota) is full."""
    if code is None:
        return "the store could not be written"
    text = f"{errno.errorcode.get(code, str(code))}: {os.strerror(code)}"
    if code in NO_SPACE:
        text += " (the store's disk is full: free space there, or move the store)"
    return text


def new_build_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(d)
