"""Images encrypted at rest: the node's key, the sealed file format, and the RAM cache restores read.

A sealed file is a header and a run of chunks, each encrypted on its own with AES-256-GCM, so a
file streams (a transfer resumes at any chunk) and damage is found chunk by chunk:

    header  MAGIC (8) | key id (8: sha256 of the key, cut) | chunk size (u32)
    chunk   nonce (12, random) | ciphertext of up to CHUNK plaintext bytes | tag (16)

Each chunk's associated data is the header, the file's name, the chunk's index and a last-chunk
flag: a chunk cannot be altered, reordered, dropped (the last one included: the one before it does
not say "last"), or moved to another file or another node's key. An empty file is one empty last
chunk. The plaintext size (the manifest's) fixes the chunk count and the sealed size.

Plaintext exists only in RAM: a build dumps into a private directory on a tmpfs, /dev/shm (its
staging dir, Store.staging), and a restore reads the build decrypted into a per-node cache there
(ImageCache), made once per build and removed when the build is replaced or the node stops.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import shutil
import stat
import struct
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

import psutil
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pool.errors import SpecError, TemplateCorrupt

log = logging.getLogger(__name__)

MAGIC = b"PIMGGCM1"
HEADER = struct.Struct(">8s8sI")
CHUNK = 1 << 20                # plaintext bytes per chunk (the last may be shorter)
NONCE = 12
TAG = 16
KEY_BYTES = 32                 # AES-256
RAM_ROOT = Path("/dev/shm")    # a tmpfs on every Linux: plaintext never reaches a disk (but swap)
CACHE_PREFIX = "pool-images."  # RAM_ROOT/pool-images.PID.RANDOM: one node's decrypted builds
DUMP_PREFIX = "pool-dump."     # RAM_ROOT/pool-dump.PID.RANDOM: one build's plaintext dump


def chunk_count(plain_size: int) -> int:
    return max(1, -(-plain_size // CHUNK))


def sealed_size(plain_size: int) -> int:
    """The size on disk of a sealed file of plain_size bytes."""
    return HEADER.size + plain_size + chunk_count(plain_size) * (NONCE + TAG)


@dataclass(frozen=True)
class ImageKey:
    """A node's image key (AES-256): 32 random bytes in a file of its own, 0600, root's."""

    key: bytes
    path: Path

    @property
    def key_id(self) -> bytes:
        """Names the key in every sealed file's header: a file sealed by another key is told
        apart from a damaged one."""
        return hashlib.sha256(b"pool image key\0" + self.key).digest()[:8]

    @classmethod
    def load_or_create(cls, path: Path, store_root: Path) -> "ImageKey":
        """The key at path, made (32 random bytes, 0600, parent 0700 if made) if there is none.
        SpecError naming the file if it is inside the store, readable by others, not a regular
        file, or not a key."""
        path = Path(path)
        where = f"{path} ([service] image_key)"
        root = Path(store_root).resolve()
        if path.resolve() == root or root in path.resolve().parents:
            raise SpecError(where, None, "the image key must not be inside the store it "
                                         "protects (a copied store would carry its key)")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return cls._create(path)
        except OSError as e:
            raise SpecError(where, None, f"cannot open the image key: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SpecError(where, None, "the image key is not a regular file")
            if st.st_mode & 0o077:
                raise SpecError(where, None, "the image key is readable by others; chmod 600 it")
            key = f.read(KEY_BYTES + 1)
        if len(key) != KEY_BYTES:
            raise SpecError(where, None, f"an image key is {KEY_BYTES} bytes, this file has "
                                         f"{len(key)}{'+' if len(key) > KEY_BYTES else ''}")
        return cls(key, path)

    @classmethod
    def _create(cls, path: Path) -> "ImageKey":
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        key = os.urandom(KEY_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        log.warning("created the image key %s (0600): the store's images are encrypted with it; "
                    "back it up where the store is not: without it they cannot be restored", path)
        return cls(key, path)


class Sealer:
    """Encrypts one file's plaintext as it comes (write), chunk by chunk, into out; finish()
    writes the last chunk. start_index: chunks already in out (a resumed file)."""

    def __init__(self, key: ImageKey, rel: str, out: IO[bytes], start_index: int = 0) -> None:
        self._aead = AESGCM(key.key)
        self._header = _header(key)
        self._rel = rel.encode()
        self._out = out
        self._index = start_index
        self._buf = bytearray()
        if start_index == 0:
            out.write(self._header)

    @property
    def chunks_written(self) -> int:
        return self._index

    def write(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) > CHUNK:  # the last chunk waits for finish(): it carries the flag
            self._emit(bytes(self._buf[:CHUNK]), last=False)
            del self._buf[:CHUNK]

    def finish(self) -> None:
        self._emit(bytes(self._buf), last=True)
        self._buf.clear()

    def _emit(self, plain: bytes, last: bool) -> None:
        nonce = os.urandom(NONCE)
        self._out.write(nonce + self._aead.encrypt(nonce, plain, _aad(self._header, self._rel,
                                                                       self._index, last)))
        self._index += 1


def open_chunks(key: ImageKey, read_at: Callable[[int, int], bytes], rel: str, plain_size: int,
                template: str, first: int = 0) -> Iterator[bytes]:
    """The plaintext of a sealed file, chunk by chunk from chunk first on, each authenticated;
    read_at(offset, n) reads the sealed bytes. TemplateCorrupt naming the file if it is not
    sealed, sealed with another key, or any chunk was altered, moved, dropped or cut short."""
    header = _check_header(key, read_at(0, HEADER.size), rel, template)
    aead = AESGCM(key.key)
    name = rel.encode()
    count = chunk_count(plain_size)
    for i in range(first, count):
        size = min(CHUNK, plain_size - i * CHUNK)
        want = NONCE + size + TAG
        sealed = read_at(HEADER.size + i * (CHUNK + NONCE + TAG), want)
        if len(sealed) != want:
            raise TemplateCorrupt(template, f"{rel} is cut short at chunk {i} of {count}")
        try:
            yield aead.decrypt(sealed[:NONCE], sealed[NONCE:], _aad(header, name, i, i == count - 1))
        except InvalidTag as e:
            raise TemplateCorrupt(template, f"{rel}: chunk {i} of {count} fails authentication "
                                            "(altered, moved or cut)") from e


def file_reader(f: IO[bytes]) -> Callable[[int, int], bytes]:
    def read_at(offset: int, n: int) -> bytes:
        return os.pread(f.fileno(), n, offset)
    return read_at


def fd_reader(fd: int) -> Callable[[int, int], bytes]:
    return lambda offset, n: os.pread(fd, n, offset)


def plain_digest(key: ImageKey, path: Path, rel: str, plain_size: int, template: str,
                 chunks: int | None = None, out: IO[bytes] | None = None) -> "hashlib._Hash":
    """sha256 of a sealed file's plaintext (the first `chunks` chunks only, if given), each chunk
    authenticated; written to out too, if given."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for i, plain in enumerate(open_chunks(key, file_reader(f), rel, plain_size, template)):
            if chunks is not None and i >= chunks:
                break
            h.update(plain)
            if out is not None:
                out.write(plain)
    return h


def seal_file(key: ImageKey, src: Path, dst: Path, rel: str) -> tuple[int, str]:
    """Encrypt src into dst (new, 0600); returns the plaintext's size and sha256."""
    h = hashlib.sha256()
    size = 0
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
        sealer = Sealer(key, rel, out)
        while data := f.read(CHUNK):
            h.update(data)
            size += len(data)
            sealer.write(data)
        sealer.finish()
    return size, h.hexdigest()


def is_sealed(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _header(key: ImageKey) -> bytes:
    return HEADER.pack(MAGIC, key.key_id, CHUNK)


def _aad(header: bytes, name: bytes, index: int, last: bool) -> bytes:
    return header + struct.pack(">H", len(name)) + name + struct.pack(">QB", index, last)


def _check_header(key: ImageKey, raw: bytes, rel: str, template: str) -> bytes:
    if len(raw) != HEADER.size or raw[:len(MAGIC)] != MAGIC:
        raise TemplateCorrupt(template, f"{rel} is not encrypted (built or received without "
                                        "encrypt_images?)")
    _, key_id, chunk = HEADER.unpack(raw)
    if key_id != key.key_id:
        raise TemplateCorrupt(template, f"{rel} is encrypted with another key (key id "
                                        f"{key_id.hex()}; this node's {key.path} is "
                                        f"{key.key_id.hex()})")
    if chunk != CHUNK:
        raise TemplateCorrupt(template, f"{rel}: chunk size {chunk}, this version reads {CHUNK}")
    return raw


# --- plaintext in RAM ---------------------------------------------------------------------------
def ram_dir(prefix: str, root: Path = RAM_ROOT) -> Path:
    """A new private (0700) directory on the RAM-backed root, named PREFIX.PID.RANDOM."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", dir=root))


def remove_stale(root: Path = RAM_ROOT) -> list[Path]:
    """Plaintext dirs that processes which no longer run left behind (killed nodes, builds):
    removed. Only our own uid's."""
    removed = []
    for p in root.glob("pool-*.*.*"):
        prefix, _, rest = p.name.partition(".")
        pid = rest.split(".", 1)[0]
        if f"{prefix}." not in (CACHE_PREFIX, DUMP_PREFIX) or not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            if p.lstat().st_uid == os.geteuid() and p.is_dir() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


class ImageCache:
    """A node's decrypted builds, in one private RAM directory: NAME@BUILD/ per build, decrypted
    (every chunk authenticated, every sha256 checked) once, on first use. Readers hold a lease
    (lease()); a build dropped while leased goes when its last lease ends. After close(),
    each lease decrypts a build of its own, removed when it ends: nothing outlives the node."""

    def __init__(self, root: Path = RAM_ROOT) -> None:
        self.root = root
        self._dir: Path | None = None
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        self._leases: dict[str, int] = {}
        self._stale: set[str] = set()
        self._closed = False

    @property
    def path(self) -> Path | None:
        return self._dir

    def entries(self) -> list[str]:
        return sorted(p.name for p in self._dir.iterdir()) if self._dir and self._dir.is_dir() else []

    @contextlib.contextmanager
    def lease(self, entry: str, fill: Callable[[Path], None]) -> Iterator[Path]:
        """The directory of entry (NAME@BUILD), filled by fill(tmp) if not there yet, kept while
        the lease is held."""
        key, path = self._acquire(entry, fill)
        try:
            yield path
        finally:
            self._release(key)

    def _acquire(self, entry: str, fill: Callable[[Path], None]) -> tuple[str, Path]:
        with self._lock:
            if self._closed:
                one_off = ram_dir(CACHE_PREFIX, self.root)
                self._leases[str(one_off)] = 1
            else:
                one_off = None
                if self._dir is None:
                    remove_stale(self.root)
                    self._dir = ram_dir(CACHE_PREFIX, self.root)
                    _remove_at_exit(self)
                self._leases[entry] = self._leases.get(entry, 0) + 1
                self._stale.discard(entry)
                building = self._building.setdefault(entry, threading.Lock())
        try:
            if one_off is not None:
                fill(one_off)
                return str(one_off), one_off
            final = self._dir / entry
            with building:
                if not final.is_dir():
                    tmp = Path(tempfile.mkdtemp(prefix=".fill-", dir=self._dir))
                    try:
                        fill(tmp)
                        os.rename(tmp, final)
                    except BaseException:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise
            return entry, final
        except BaseException:
            self._release(str(one_off) if one_off is not None else entry)
            raise

    def _release(self, entry: str) -> None:
        """End one lease (entry: NAME@BUILD, or a one-off's path)."""
        with self._lock:
            left = self._leases.get(entry, 0) - 1
            if left > 0:
                self._leases[entry] = left
                return
            self._leases.pop(entry, None)
            gone = entry.startswith("/") or entry in self._stale or self._closed
        if gone:
            self._remove(entry)

    def drop(self, name: str, keep: str | None = None) -> None:
        """Forget name's decrypted builds but keep (an entry NAME@BUILD): removed now, or when
        their last lease ends."""
        for entry in self.entries():
            if entry.split("@", 1)[0] == name and entry != keep and not entry.startswith("."):
                with self._lock:
                    if self._leases.get(entry):
                        self._stale.add(entry)
                        continue
                self._remove(entry)

    def close(self) -> None:
        """Every decrypted build goes (leased ones when their lease ends), and the cache's
        directory with the last."""
        with self._lock:
            self._closed = True
            leased = set(self._leases)
        for entry in self.entries():
            if entry not in leased:
                self._remove(entry)
        self._remove_dir_if_empty()

    def _remove(self, entry: str) -> None:
        if entry.startswith("/"):
            shutil.rmtree(entry, ignore_errors=True)
            return
        if self._dir is not None:
            shutil.rmtree(self._dir / entry, ignore_errors=True)
        if self._closed:
            self._remove_dir_if_empty()

    def _remove_dir_if_empty(self) -> None:
        with self._lock:
            if self._dir is not None and not self._leases:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None


def _remove_at_exit(cache: ImageCache) -> None:
    """A process that ends without closing its store (a CLI restore, a test) leaves no plaintext."""
    ref = weakref.ref(cache)

    def remove() -> None:
        c = ref()
        if c is not None and c.path is not None:
            shutil.rmtree(c.path, ignore_errors=True)
    atexit.register(remove)
