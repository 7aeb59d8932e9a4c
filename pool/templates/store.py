"""The template store: atomic publish, manifests, integrity, private permissions.

Layout (everything 0700 dirs / 0600 files: images hold process memory, secrets included):

    STORE/NAME/current -> builds/BUILD_ID     swapped atomically by rename(2) of a new symlink
    STORE/NAME/builds/BUILD_ID/manifest.json
    STORE/NAME/builds/BUILD_ID/image/*.img    CRIU images + cpuinfo.img
    STORE/NAME/builds/BUILD_ID/image/parent/  a pre-dump's images, if the dump was iterative
    STORE/.staging/...                        builds in progress; never read by restores

With an image key (`[service] encrypt_images`), every image file is sealed (AES-GCM in chunks,
pool/templates/imagecrypt.py) and the manifest keeps the plaintext's sizes and sha256s: a build's
dump goes to RAM and is sealed into the store at publish; restores read a build decrypted into the
node's RAM cache (readable()). The Store is the one reader and writer of image files, so no caller
sees the difference but through readable().

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from pool.errors import TemplateCorrupt, TemplateNotFound
from pool.names import is_stored_name
from pool.templates import imagecrypt
from pool.templates.imagecrypt import ImageCache, ImageKey
from pool.templates.manifest import FORMAT, MANIFEST, PARENT, ImageFile, Manifest, valid_build_id

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


def image_entries(image: Path) -> list[tuple[str, Path]]:
    """What an image dir holds, named as a manifest names its files: NAME for each entry, and
    parent/NAME for those of a pre-dump's image when image/parent is a dir (CRIU's relative link
    to it in the build that was dumped, a plain dir where it was received), sorted."""
    out = []
    for p in sorted(image.iterdir()):
        if p.name == PARENT and p.is_dir():
            out += [(f"{PARENT}/{q.name}", q) for q in sorted(p.iterdir())]
        else:
            out.append((p.name, p))
    return out


@dataclass(frozen=True)
class Template:
    """A published template: its manifest and where its image is. key: its files are sealed
    with it (only the store reads them: Store.readable gives the plaintext's plain_dir)."""

    name: str
    build_dir: Path
    manifest: Manifest
    key: ImageKey | None = None
    plain_dir: Path | None = None

    @property
    def image_dir(self) -> Path:
        """Where CRIU reads the image: the build's own files, or their plaintext in RAM."""
        if self.plain_dir is not None:
            return self.plain_dir
        if self.key is not None:
            raise RuntimeError(f"{self.name}: its image is encrypted; read it through "
                               "Store.readable()")
        return self.stored_dir

    @property
    def stored_dir(self) -> Path:
        """The build's image files as the store holds them (sealed, with a key)."""
        return self.build_dir / "image"

    def stored_size(self, meta: ImageFile) -> int:
        return imagecrypt.sealed_size(meta.size) if self.key is not None else meta.size

    @property
    def build_id(self) -> str:
        return self.manifest.build_id

    @property
    def image_bytes(self) -> int:
        return self.manifest.image_bytes

    def verify(self, full: bool = True) -> None:
        """Check every stored image file against the manifest: sizes always, sha256 when full
        (of the plaintext: a sealed file is decrypted, each chunk authenticated, on the way)."""
        files = self.manifest.files
        image = self.stored_dir
        present = {rel for rel, _ in image_entries(image)} if image.is_dir() else set()
        missing = sorted(set(files) - present)
        if missing:
            raise TemplateCorrupt(self.name, f"image file missing: {missing[0]}")
        extra = sorted(present - set(files))
        if extra:
            raise TemplateCorrupt(self.name, f"unexpected file in image: {extra[0]}")
        for rel, meta in files.items():
            path = image / rel
            size, want = path.stat().st_size, self.stored_size(meta)
            if size != want:
                raise TemplateCorrupt(self.name, f"{rel} is {size} bytes, manifest says {want}"
                                      + (" (sealed)" if self.key is not None else ""))
            if full and self.digest(rel).hexdigest() != meta.sha256:
                raise TemplateCorrupt(self.name, f"{rel} does not match its sha256 in the manifest")

    def digest(self, rel: str, out: Any = None) -> Any:
        """The sha256 of stored file rel's plaintext (copied to out too, if given)."""
        path = self.stored_dir / rel
        if self.key is None:
            if out is not None:
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            return sha256_file(path)
        return imagecrypt.plain_digest(self.key, path, rel, self.manifest.files[rel].size,
                                       self.name, out=out)


class Store:
    def __init__(self, root: Path, key: ImageKey | None = None,
                 ram_root: Path = imagecrypt.RAM_ROOT) -> None:
        """key: image files are sealed with it (encrypt_images); plaintext lives under ram_root."""
        self.root = Path(root)
        self.key = key
        self.ram_root = ram_root
        self.cache = ImageCache(ram_root) if key is not None else None
        # name -> its current build as last read: a published build never changes, so a build id
        # (one readlink) says whether the entry is still current
        self._current: dict[str, Template] = {}

    @property
    def encrypted(self) -> bool:
        return self.key is not None

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
        # resolved: this build is pinned, a later swap does not move us
        return load_build(link.resolve(), name, key=self.key)

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

    def current(self, name: str) -> Template | None:
        """NAME's current build, or None if nothing is published: one readlink(2); its manifest is
        read and parsed once per build (get() when this build id is first seen), so the spawn path
        can ask every time. Errors as current_build_id() and get()."""
        build = self.current_build_id(name) if is_stored_name(name) else None
        if build is None:
            self._current.pop(name, None)
            return None
        t = self._current.get(name)
        if t is None or t.build_id != build:
            t = self._current[name] = self.get(name)
        return t

    # -- plaintext for restores ----------------------------------------------------------------------
    @contextlib.contextmanager
    def readable(self, template: Template) -> Iterator[Template]:
        """template as CRIU reads it, for as long as the context lasts: itself in a plain store;
        in an encrypted one, with plain_dir its build decrypted into the node's RAM cache (once
        per build: every chunk authenticated and every sha256 checked, TemplateCorrupt naming
        the file otherwise, and nothing half-decrypted kept)."""
        if template.key is None or template.plain_dir is not None:
            yield template
            return
        assert self.cache is not None, "an encrypted template from a store without a key"
        with self.cache.lease(f"{template.name}@{template.build_id}",
                              lambda d: _decrypt_build(template, d)) as plain:
            yield replace(template, plain_dir=plain)

    def drop_readable(self, name: str, keep_build: str | None = None) -> None:
        """Drop name's decrypted builds from RAM but keep_build's (leased ones: when released)."""
        if self.cache is not None:
            self.cache.drop(name, None if keep_build is None else f"{name}@{keep_build}")

    def close(self) -> None:
        """The node stops: every decrypted build leaves RAM (a restore still reading one: when it
        ends; later restores decrypt a build of their own, removed when they end)."""
        if self.cache is not None:
            self.cache.close()

    def all(self) -> Iterator[Template]:
        for name in self.names():
            with contextlib.suppress(TemplateNotFound, TemplateCorrupt):
                yield self.get(name)

    # -- writing -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A private directory to build into (CRIU dumps into its image/); removed on exit
        unless it was published. Encrypted: a private RAM directory, so the dump's plaintext
        never reaches the disk; publish seals it into the store."""
        if self.key is not None:
            path = imagecrypt.ram_dir(imagecrypt.DUMP_PREFIX, self.ram_root)
        else:
            path = self._disk_staging(name)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _disk_staging(self, name: str) -> Path:
        self._ensure_root()
        staging_root = self.root / ".staging"
        staging_root.mkdir(exist_ok=True, mode=0o700)
        return Path(tempfile.mkdtemp(prefix=f"{name}.", dir=staging_root))

    def publish(self, name: str, staged: Path, facts: Mapping[str, Any]) -> Template:
        """Seal staged (see seal()) and make it NAME's current build atomically. Encrypted: its
        image is sealed into a staging dir of the store, which is published."""
        if self.key is None:
            template = seal(staged, name, facts)
            return self._install(name, staged, template.manifest.build_id)
        disk = self._disk_staging(name)
        try:
            template = seal(staged, name, facts, key=self.key, into=disk)
            return self._install(name, disk, template.manifest.build_id)
        finally:
            shutil.rmtree(disk, ignore_errors=True)  # gone already once installed

    def publish_received(self, name: str, staged: Path, manifest: Manifest) -> Template:
        """Publish a build made on another node, keeping its build_id and manifest as they are.

        staged/image must hold exactly the manifest's files, each matching its size and sha256
        (TemplateCorrupt otherwise, and nothing is published). If that build is already here it
        is reused: publishing the same build twice is harmless.
        """
        if manifest.name != name:
            raise TemplateCorrupt(name, f"{MANIFEST}: name is {manifest.name!r}, expected {name!r}")
        received = Template(name=name, build_dir=staged, manifest=manifest, key=self.key)
        received.verify(full=True)
        final = self.root / name / "builds" / manifest.build_id
        if final.is_dir():
            try:
                Template(name=name, build_dir=final, manifest=manifest, key=self.key).verify(full=True)
            except TemplateCorrupt:
                shutil.rmtree(final, ignore_errors=True)  # a damaged leftover: replace it
            else:
                shutil.rmtree(staged, ignore_errors=True)
                return self._swap(name, final)
        for _, p in image_entries(staged / "image"):
            os.chmod(p, 0o600)
        write_manifest(staged, manifest)
        return self._install(name, staged, manifest.build_id)

    def _install(self, name: str, staged: Path, build_id: str) -> Template:
        """Sync the sealed build staged, move it into builds/ and swap `current` to it."""
        for d in (staged, staged / "image", staged / "image" / PARENT):
            if d.is_dir():
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
        template = self._current[name] = self.get(name)
        return template

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
        self._current.pop(name, None)
        self.drop_readable(name)
        shutil.rmtree(tdir, ignore_errors=True)

    def _prune(self, tdir: Path, keep: str) -> None:
        builds = sorted((p for p in (tdir / "builds").iterdir() if p.name != keep),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in builds[KEEP_PREVIOUS:]:
            shutil.rmtree(old, ignore_errors=True)


def load_build(build_dir: Path, name: str | None = None, key: ImageKey | None = None) -> Template:
    """The sealed build in build_dir (published or not: a fork's, a snapshot's), named as its
    manifest says unless name is given."""
    try:
        raw = json.loads((build_dir / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise TemplateCorrupt(name or str(build_dir), f"no {MANIFEST} in {build_dir}") from e
    except json.JSONDecodeError as e:
        raise TemplateCorrupt(name or str(build_dir), f"{MANIFEST} is not valid JSON: {e.msg}") from e
    name = name or str(raw.get("name"))
    return Template(name=name, build_dir=build_dir, manifest=Manifest.from_dict(raw, name), key=key)


def seal(build_dir: Path, name: str, facts: Mapping[str, Any],
         key: ImageKey | None = None, into: Path | None = None) -> Template:
    """Finish a build dir whose image/ is complete: its files made private (0600) and listed with
    size and sha256, the manifest (facts plus format, name, files, image_bytes) checked and
    written. Store.publish seals its staging dir so; a fork seals a dir it ships unpublished.
    With key, each file is encrypted (the manifest lists the plaintext's size and sha256) into
    into/image (the plaintext left to the caller), or in place (the plaintext removed)."""
    if not is_stored_name(name):
        raise ValueError(f"bad template name {name!r}")
    image = build_dir / "image"
    files = {}
    if key is None:
        for rel, p in image_entries(image):
            os.chmod(p, 0o600)
            files[rel] = ImageFile(size=p.stat().st_size, sha256=sha256_file(p).hexdigest())
    else:
        out = into or build_dir
        sealed = out / ".sealed"
        sealed.mkdir(mode=0o700)
        for rel, p in image_entries(image):
            (sealed / rel).parent.mkdir(exist_ok=True, mode=0o700)
            size, digest = imagecrypt.seal_file(key, p, sealed / rel, rel)
            files[rel] = ImageFile(size=size, sha256=digest)
        if into is None:
            shutil.rmtree(image)
        os.rename(sealed, out / "image")
        build_dir = out
    manifest = Manifest.from_dict({
        **facts, "format": FORMAT, "name": name,
        "files": {rel: f.to_dict() for rel, f in files.items()},
        "image_bytes": sum(f.size for f in files.values())}, name)
    write_manifest(build_dir, manifest)
    return Template(name=name, build_dir=build_dir, manifest=manifest, key=key)


def _decrypt_build(template: Template, dest: Path) -> None:
    """Every image file of template, decrypted into dest (private RAM), checked against the
    manifest's sha256."""
    template.verify(full=False)
    for rel, meta in template.manifest.files.items():
        (dest / rel).parent.mkdir(exist_ok=True, mode=0o700)
        fd = os.open(dest / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb", buffering=0) as out:
            if template.digest(rel, out=out).hexdigest() != meta.sha256:
                raise TemplateCorrupt(template.name, f"{rel} does not match its sha256 in the "
                                                     "manifest")


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
