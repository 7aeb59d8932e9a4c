"""Ship a published template (manifest.json + image/*) from one node's store to another's over TCP.

What ships is the manifest's files, by the names it gives them: an iterative dump's (a snapshot's)
include its pre-dump's images as parent/NAME, received into image/parent/, where CRIU looks.

The node that needs the template pulls it from one that has it (`fetch` against a `TemplateSource`):

    client -> hello                      (protocol.make_hello: version, token)
    server -> hello reply | error
    client -> {op: fetch, name, facts, codecs, build_id?}
    server -> {op: offer, manifest, codec} | {op: error, error}      compatibility checked here
    client -> {op: want, have: {file: sha256}, resume: {file: offset}} | {op: cancel}
    server -> per file not in `have`: {op: file, name, offset, size}, then data chunks
              (u32 length + compressed bytes; length 0 ends the file; ABORT + an error frame
              stops the transfer), and finally {op: done}

Over mutual TLS when both ends have the cluster's TLS files (pool/wire/tls.py: the source's
certificate must name the node the fetcher was told to expect); plain TCP otherwise, which only
tests and `--insecure-plain-tcp` set-ups use (the token then travels in clear).

Headers are pool/wire/protocol.py frames; file data is raw length-prefixed chunks, each file its own
compressed stream (zstd, else zlib, else none), so a transfer can resume at any file and offset.

Encrypted stores (`[service] encrypt_images`, pool/templates/imagecrypt.py): what travels is always
the plaintext, inside TLS: the sender decrypts its sealed files as it streams (each chunk
authenticated), the receiver seals what it receives with its own key before it touches the disk,
so nodes with different keys (or none) exchange templates, and the manifest's sha256s (of the
plaintext) check the transfer the same way. A receiver's .part holds whole sealed chunks only: a
resumed file restarts at the last whole chunk.

Nothing half-received is ever usable: files land in the store's partial dir (Store.partial_dir),
each as NAME.part until its size and sha256 match the sender's manifest, and the build is
published (Store.publish_received) only once every file matches. An interrupted transfer keeps
what it verified, plus the .part in flight; a retry says so (`have`, `resume`) and gets the rest.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import ssl
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from pool.errors import (Incompatible, PoolError, ProtocolError, TemplateCorrupt, TemplateNotFound,
                         TransferError)
from pool.templates import imagecrypt
from pool.templates.compat import NodeFacts, compatibility_problem
from pool.templates.imagecrypt import ImageKey
from pool.templates.manifest import ImageFile, Manifest
from pool.templates.store import Store, Template, image_entries, sha256_file, write_problem
from pool.wire import protocol
from pool.wire.tls import TlsFiles, closed_in_handshake, handshake_error

try:  # optional at import time: a node without it still speaks zlib
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None

CHUNK = struct.Struct(">I")
ABORT = 0xFFFFFFFF          # chunk length that announces an error frame instead of data
BLOCK = 1 << 20             # bytes read per chunk on the sending side
MAX_CHUNK = 8 << 20         # a compressed chunk larger than this is a broken or hostile peer
STREAM_LIMIT = 4 << 20      # StreamReader buffer: the 64 KiB default pauses the socket per chunk
ZSTD_LEVEL = 1              # criu-notes: zstd -1 makes images 3-5x smaller at ~1 GB/s
CODECS = ("zstd", "zlib", "none") if zstandard is not None else ("zlib", "none")

Check = Callable[[Manifest, NodeFacts], "str | None"]
Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass
class FetchResult:
    template: Template | None     # the published template (set once fetch returns)
    files_sent: int = 0          # files that came over the wire (some maybe resumed mid-file)
    files_reused: int = 0        # files a previous, interrupted transfer had already verified
    bytes_raw: int = 0           # file bytes received (uncompressed)
    bytes_wire: int = 0          # compressed bytes received
    codec: str = "none"
    seconds: float = 0.0
    already_current: bool = False  # the store already had this build: nothing moved


# --- framing helpers ------------------------------------------------------------------------------
async def _read_frame(reader: asyncio.StreamReader, idle: float,
                      max_frame: int = protocol.MAX_FRAME) -> dict:
    try:
        header = await asyncio.wait_for(reader.readexactly(protocol.HEADER.size), idle)
        (size,) = protocol.HEADER.unpack(header)
        if size > max_frame:
            raise ProtocolError(f"frame declares {size} bytes, over the limit of {max_frame}",
                                size=size, limit=max_frame)
        payload = await asyncio.wait_for(reader.readexactly(size), idle)
    except asyncio.IncompleteReadError as e:
        raise TransferError("the peer closed the connection") from e
    except TimeoutError as e:
        raise TransferError(f"the peer sent nothing for {idle:g}s") from e
    except ssl.SSLError as e:  # TLS 1.3: the server's refusal of our certificate arrives here
        raise handshake_error(e, "the peer", None) from e
    except OSError as e:
        raise TransferError(f"connection failed: {e.strerror or e}") from e
    return protocol.decode_payload(payload)


async def _read_chunk(reader: asyncio.StreamReader, idle: float) -> bytes | None:
    """One data chunk; b"" ends a file; None announces an error frame."""
    try:
        (size,) = CHUNK.unpack(await asyncio.wait_for(reader.readexactly(CHUNK.size), idle))
        if size == ABORT:
            return None
        if size > MAX_CHUNK:
            raise ProtocolError(f"data chunk of {size} bytes is over the limit")
        return await asyncio.wait_for(reader.readexactly(size), idle) if size else b""
    except asyncio.IncompleteReadError as e:
        raise TransferError("the peer closed the connection in the middle of a file") from e
    except TimeoutError as e:
        raise TransferError(f"the peer sent nothing for {idle:g}s") from e
    except ssl.SSLError as e:  # TLS 1.3: the server's refusal of our certificate arrives here
        raise handshake_error(e, "the peer", None) from e
    except OSError as e:
        raise TransferError(f"connection failed: {e.strerror or e}") from e


async def _send(writer: asyncio.StreamWriter, data: bytes, idle: float) -> None:
    writer.write(data)
    try:
        await asyncio.wait_for(writer.drain(), idle)
    except TimeoutError as e:
        raise TransferError(f"the peer took nothing for {idle:g}s") from e
    except ssl.SSLError as e:
        raise handshake_error(e, "the peer", None) from e
    except OSError as e:
        raise TransferError(f"connection failed: {e.strerror or e}") from e


def _expect(msg: dict, op: str) -> dict:
    if msg.get("op") == "error":
        raise protocol.error_from_wire(msg.get("error"))
    if msg.get("op") != op:
        raise ProtocolError(f"expected {op!r}, got {str(msg.get('op'))[:40]!r}")
    return msg


def _compressor(codec: str) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
    if codec == "zstd":
        c = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
        return c.compress, c.flush
    if codec == "zlib":
        z = zlib.compressobj(1)
        return z.compress, z.flush
    return (lambda b: b), (lambda: b"")


# --- sending side ------------------------------------------------------------------------------------
class TemplateSource:
    """Serves the templates of one store to nodes that fetch them. One connection, one template."""

    def __init__(self, store: Store, *, tokens: set[str] | None = None, tls: TlsFiles | None = None,
                 check: Check = compatibility_problem, idle_timeout: float = 30.0) -> None:
        self.store = store
        self.tokens = tokens
        self.tls = tls                # mutual TLS; None: plain TCP (tests, --insecure-plain-tcp)
        self.check = check            # (manifest, receiver's facts) -> why not, or None
        self.idle_timeout = idle_timeout
        self.bytes_sent = 0
        self.transfers = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0, *,
                    sock: Any = None) -> tuple[str, int]:
        """Listen on host:port (or on a bound socket, e.g. one made in another netns)."""
        kw: dict[str, Any] = {"limit": STREAM_LIMIT}
        if self.tls is not None:
            kw.update(ssl=self.tls.server_context(), ssl_handshake_timeout=self.idle_timeout)
        if sock is not None:
            self._server = await asyncio.start_server(self._accept, sock=sock, **kw)
        else:
            self._server = await asyncio.start_server(self._accept, host, port, **kw)
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        finally:
            self._tasks.discard(task)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one fetch; any failure is told to the peer (if it can still hear) and closes."""
        fds: dict[str, int] = {}
        streaming = False
        try:
            idle = self.idle_timeout
            # Before authentication nobody gets to make us buffer megabytes.
            protocol.check_hello(await _read_frame(reader, idle, protocol.HELLO_MAX_FRAME), self.tokens)
            await _send(writer, protocol.encode_frame(protocol.make_hello_reply("pool-transfer")), idle)
            req = _expect(await _read_frame(reader, idle), "fetch")
            template, codec = self._offer(req)
            fds = _open_pinned(template)
            await _send(writer, protocol.encode_frame(
                {"op": "offer", "manifest": template.manifest.to_dict(), "codec": codec}), idle)
            want = await _read_frame(reader, idle)
            if want.get("op") == "cancel":
                return
            want = _expect(want, "want")
            have, resume = want.get("have") or {}, want.get("resume") or {}
            if not isinstance(have, dict) or not isinstance(resume, dict):
                raise ProtocolError("want: have and resume must be maps")
            self.transfers += 1
            streaming = True
            for rel, meta in sorted(template.manifest.files.items()):
                if have.get(rel) == meta.sha256:
                    continue
                offset = resume.get(rel, 0)
                if not isinstance(offset, int) or isinstance(offset, bool) \
                        or not 0 <= offset <= meta.size:
                    raise ProtocolError(f"want: bad resume offset for {rel}")
                await _send(writer, protocol.encode_frame(
                    {"op": "file", "name": rel, "offset": offset, "size": meta.size}), idle)
                await self._stream(writer, _plain_reader(template, rel, fds[rel], offset),
                                   offset, meta.size, codec, idle)
            streaming = False
            await _send(writer, protocol.encode_frame({"op": "done"}), idle)
        except TransferError:
            pass  # the peer is gone or stalled: nobody to tell
        except Exception as e:  # noqa: BLE001  told to the peer, never a crash of the server
            err = e if isinstance(e, PoolError) else TransferError(f"sender failed: {e}")
            with contextlib.suppress(Exception):
                head = CHUNK.pack(ABORT) if streaming else b""
                writer.write(head + protocol.encode_frame({"op": "error", "error": err.to_wire()}))
                await asyncio.wait_for(writer.drain(), 5)
        finally:
            for fd in fds.values():
                os.close(fd)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    def _offer(self, req: dict) -> tuple[Template, str]:
        name = req.get("name")
        if not isinstance(name, str):
            raise ProtocolError("fetch: name must be a string")
        try:  # no facts: the receiver checks compatibility itself
            facts = None if req.get("facts") is None else NodeFacts.from_wire(req.get("facts"))
        except ValueError as e:
            raise ProtocolError(f"fetch: {e}") from e
        codecs = req.get("codecs") or ["none"]
        codec = next((c for c in codecs if c in CODECS), None) if isinstance(codecs, list) else None
        if codec is None:
            raise ProtocolError(f"fetch: no codec in common (this side has {', '.join(CODECS)})")
        template = self.store.get(name)  # TemplateNotFound / TemplateCorrupt go to the peer
        want_build = req.get("build_id")
        if want_build is not None and want_build != template.build_id:
            raise TemplateNotFound(f"{name}@{want_build}", where=f"this node (current build is "
                                                                  f"{template.build_id})")
        problem = None if facts is None else self.check(template.manifest, facts)
        if problem is not None:
            raise Incompatible(problem, template=name, build_id=template.build_id)
        return template, codec

    async def _stream(self, writer: asyncio.StreamWriter, read: Callable[[], bytes], offset: int,
                      size: int, codec: str, idle: float) -> None:
        compress, flush = _compressor(codec)
        pos = offset

        def next_chunk() -> bytes:  # in a thread: file reads and compression stay off the loop
            nonlocal pos
            out = b""
            while not out and pos < size:
                data = read()
                pos += len(data)
                out = compress(data)
            return out + flush() if pos >= size else out

        while True:
            chunk = await asyncio.to_thread(next_chunk)
            if chunk:
                await _send(writer, CHUNK.pack(len(chunk)) + chunk, idle)
                self.bytes_sent += len(chunk)
            if pos >= size:
                break
        await _send(writer, CHUNK.pack(0), idle)


def _plain_reader(template: Template, rel: str, fd: int, offset: int) -> Callable[[], bytes]:
    """The next piece of file rel's plaintext from offset on, at each call (b"" once done):
    read as is, or decrypted chunk by chunk (TemplateCorrupt on a chunk that fails: told to the
    receiver)."""
    size = template.manifest.files[rel].size
    if template.key is None:
        pos = offset

        def read_plain() -> bytes:
            nonlocal pos
            data = os.pread(fd, min(BLOCK, size - pos), pos) if pos < size else b""
            if not data and pos < size:  # told to the receiver (TransferError would be swallowed)
                raise TemplateCorrupt(template.name, f"{template.name}/{rel} shrank while being sent")
            pos += len(data)
            return data
        return read_plain
    chunks = imagecrypt.open_chunks(template.key, imagecrypt.fd_reader(fd), rel, size,
                                    template.name, first=offset // imagecrypt.CHUNK)
    skip = offset % imagecrypt.CHUNK

    def read_sealed() -> bytes:
        nonlocal skip
        data = next(chunks, b"")[skip:]
        skip = 0
        return data
    return read_sealed


def _open_pinned(template: Template) -> dict[str, int]:
    """Open every image file now: a publish that prunes this build mid-transfer cannot pull it away."""
    fds: dict[str, int] = {}
    try:
        for rel, meta in template.manifest.files.items():
            fd = os.open(template.stored_dir / rel, os.O_RDONLY | os.O_CLOEXEC)
            fds[rel] = fd
            if os.fstat(fd).st_size != template.stored_size(meta):
                raise TemplateCorrupt(template.name, f"{rel} does not have its manifest size here")
    except FileNotFoundError as e:
        for fd in fds.values():
            os.close(fd)
        raise TemplateCorrupt(template.name, f"image file missing: {Path(e.filename).name}") from e
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


# --- receiving side ----------------------------------------------------------------------------------
class _Sink:
    """Where one file's decompressed bytes go: hashed, counted against its size, appended (sealed
    first, with the store's key: no plaintext reaches the disk)."""

    def __init__(self, path: Path, hasher: Any, limit: int, template: str,
                 key: ImageKey | None = None, offset: int = 0) -> None:
        self.f = open(path, "ab")  # noqa: SIM115  closed by close()
        self.path, self.hasher, self.left, self.template = path, hasher, limit, template
        self.sealer = None if key is None else imagecrypt.Sealer(
            key, path.name[:-5], self.f, start_index=offset // imagecrypt.CHUNK)

    def write(self, data: bytes) -> int:
        if len(data) > self.left:
            raise TemplateCorrupt(self.template, f"{self.path.name[:-5]} came longer than its "
                                                 "manifest size")
        self.left -= len(data)
        self.hasher.update(data)
        if self.sealer is not None:
            self.sealer.write(data)
        else:
            self.f.write(data)
        return len(data)

    def flush(self) -> None:
        self.f.flush()

    def finish(self) -> None:
        """Every byte came: the sealed file's last chunk."""
        if self.sealer is not None:
            self.sealer.finish()

    def close(self) -> None:
        self.f.close()


class _Decoder:
    """Feeds one file's compressed chunks into a _Sink with bounded memory (no decompression bombs)."""

    def __init__(self, codec: str, sink: _Sink) -> None:
        self.codec, self.sink = codec, sink
        if codec == "zstd":
            self._z = zstandard.ZstdDecompressor().stream_writer(sink, write_size=1 << 17,
                                                                  closefd=False)
        elif codec == "zlib":
            self._z = zlib.decompressobj()

    def feed(self, chunk: bytes) -> None:
        if self.codec == "zstd":
            self._z.write(chunk)
        elif self.codec == "zlib":
            data = chunk
            while data:
                self.sink.write(self._z.decompress(data, 1 << 20))
                data = self._z.unconsumed_tail
        else:
            self.sink.write(chunk)

    def finish(self) -> None:
        if self.codec == "zstd":
            self._z.flush()
        elif self.codec == "zlib":
            self.sink.write(self._z.flush())


async def fetch(store: Store, name: str, address: tuple[str, int] | None = None, *,
                connect: Connect | None = None, token: str | None = None,
                tls: TlsFiles | None = None, server_name: str | None = None,
                facts: NodeFacts | None = None, check: Callable[[Manifest], str | None] | None = None,
                codecs: tuple[str, ...] = CODECS, build_id: str | None = None,
                timeout: float = 600.0, idle_timeout: float = 30.0) -> FetchResult:
    """Get template `name` from the TemplateSource at address into store, verified and published.

    With tls, the connection is mutual TLS and the source's certificate must name server_name
    (TlsError otherwise, before any frame is read). facts (this node's) go to the sender, which refuses an incompatible image before sending
    anything; check(manifest) -> reason is this side's own veto (default: the same pure check).
    Raises Incompatible, TemplateNotFound, TemplateCorrupt (a file did not match its sha256:
    dropped, a retry fetches it again), AuthError (TlsError: a certificate was refused), or TransferError (connection, deadline): all
    leave the store's published templates as they were, and a retry resumes.
    """
    if facts is not None and check is None:
        check = lambda m: compatibility_problem(m, facts)  # noqa: E731
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            try:
                if connect is not None:
                    reader, writer = await connect()
                else:
                    assert address is not None, "fetch needs an address or a connect function"
                    reader, writer = await _open(address, tls, server_name)
            except (ssl.SSLError, ssl.CertificateError) as e:  # before OSError: SSLError is one
                where = f"{address[0]}:{address[1]}" if address else "the template source"
                raise handshake_error(e, where, server_name) from e
            except OSError as e:
                raise TransferError(f"cannot reach the template source {address or ''}: "
                                    f"{e.strerror or e}") from e
            try:
                result = await _fetch(store, name, reader, writer, token=token, facts=facts,
                                      check=check, codecs=codecs, build_id=build_id,
                                      idle=idle_timeout)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 5)
    except TimeoutError as e:
        raise TransferError(f"fetching {name!r} took longer than {timeout:g}s") from e
    result.seconds = time.monotonic() - t0
    return result


async def _open(address: tuple[str, int], tls: TlsFiles | None,
                server_name: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if tls is None:
        return await asyncio.open_connection(*address, limit=STREAM_LIMIT)
    if not server_name:
        raise ValueError("a TLS fetch needs the source's node name (server_name)")
    return await asyncio.open_connection(*address, limit=STREAM_LIMIT, ssl=tls.client_context(),
                                         server_hostname=server_name)


async def _fetch(store: Store, name: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *, token: str | None, facts: NodeFacts | None,
                 check: Callable[[Manifest], str | None] | None, codecs: tuple[str, ...],
                 build_id: str | None, idle: float) -> FetchResult:
    await _send(writer, protocol.encode_frame(protocol.make_hello(token, "pool-transfer")), idle)
    try:
        hello_reply = await _read_frame(reader, idle)
    except TransferError as e:
        if writer.get_extra_info("ssl_object") is not None:  # see closed_in_handshake
            raise closed_in_handshake("the template source", None) from e
        raise
    protocol.check_hello_reply(hello_reply)
    await _send(writer, protocol.encode_frame({
        "op": "fetch", "name": name, "facts": facts.to_wire() if facts else None,
        "codecs": list(codecs), "build_id": build_id}), idle)
    offer = _expect(await _read_frame(reader, idle), "offer")
    codec = offer.get("codec")
    try:
        manifest = Manifest.from_dict(offer.get("manifest"), name)
    except TemplateCorrupt as e:
        raise TemplateCorrupt(name, f"the sender's manifest is unusable: {e.reason}") from e
    if codec not in codecs:
        raise ProtocolError(f"the sender chose codec {codec!r}, which was not offered")
    if build_id is not None and manifest.build_id != build_id:
        raise TemplateNotFound(f"{name}@{build_id}", where="the sender")
    why = check(manifest) if check is not None else None
    if why is not None:
        await _send(writer, protocol.encode_frame({"op": "cancel"}), idle)
        raise Incompatible(why, template=name, build_id=manifest.build_id)
    with contextlib.suppress(TemplateNotFound, TemplateCorrupt):
        current = store.get(name)
        if current.build_id == manifest.build_id:
            current.verify(full=False)
            await _send(writer, protocol.encode_frame({"op": "cancel"}), idle)
            return FetchResult(template=current, codec=codec, already_current=True)

    try:
        return await _receive(store, name, reader, writer, manifest, codec, idle)
    except OSError as e:  # the network's are TransferErrors already: this is the store's disk
        raise TransferError(f"cannot store {name!r} here: {write_problem(e.errno)}",
                            errno=e.errno) from e


async def _receive(store: Store, name: str, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, manifest: Manifest, codec: str,
                   idle: float) -> FetchResult:
    """Receive the files this store lacks into its partial dir, then publish the build."""
    async with _partial_lock(store, name, idle):
        partial = store.partial_dir(name, manifest.build_id)
        have, resume, hashers = await asyncio.to_thread(_scan_partial, partial, manifest,
                                                        store.key)
        await _send(writer, protocol.encode_frame({
            "op": "want", "have": have, "resume": {k: v for k, v in resume.items() if v}}), idle)
        result = FetchResult(template=None, files_reused=len(have), codec=codec)
        received: set[str] = set()
        while True:
            head = await _read_frame(reader, idle)
            if head.get("op") == "done":
                break
            head = _expect(head, "file")
            rel = head.get("name")
            files = manifest.files
            if rel not in files or rel in have or rel in received:
                raise ProtocolError(f"the sender sent an unexpected file {str(rel)[:80]!r}")
            if head.get("offset") != resume.get(rel, 0) or head.get("size") != files[rel].size:
                raise ProtocolError(f"the sender sent {rel} from the wrong offset or size")
            await _receive_file(reader, partial / "image", rel, files[rel], codec,
                                resume.get(rel, 0), hashers.get(rel), idle, result, store.key)
            received.add(rel)
        missing = set(manifest.files) - set(have) - received
        if missing:
            raise TransferError(f"the sender ended without sending {sorted(missing)[0]}")
        result.files_sent = len(received)
        result.template = await asyncio.to_thread(store.publish_received, name, partial, manifest)
    return result


async def _receive_file(reader: asyncio.StreamReader, image: Path, rel: str, meta: ImageFile,
                        codec: str, offset: int, hasher: Any, idle: float,
                        result: FetchResult, key: ImageKey | None) -> None:
    part = image / f"{rel}.part"
    part.parent.mkdir(exist_ok=True, mode=0o700)  # parent/NAME: a pre-dump's image
    if offset == 0:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        hasher = hashlib.sha256()
    sink = _Sink(part, hasher, meta.size - offset, image.parent.name.split("@")[0], key, offset)
    decoder = _Decoder(codec, sink)
    try:
        while True:
            chunk = await _read_chunk(reader, idle)
            if chunk is None:
                raise protocol.error_from_wire(_expect(await _read_frame(reader, idle),
                                                       "error").get("error"))
            if not chunk:
                break
            result.bytes_wire += len(chunk)
            before = sink.left
            await asyncio.to_thread(decoder.feed, chunk)
            result.bytes_raw += before - sink.left
        await asyncio.to_thread(decoder.finish)
        if sink.left == 0:
            await asyncio.to_thread(sink.finish)
    finally:
        sink.close()
    if sink.left != 0 or hasher.hexdigest() != meta.sha256:
        part.unlink()  # never resume from bytes that are known bad
        raise TemplateCorrupt(image.parent.name.split("@")[0],
                              f"{rel} did not match its sha256 in the sender's manifest")
    os.rename(part, image / rel)


def _scan_partial(partial: Path, manifest: Manifest,
                  key: ImageKey | None) -> tuple[dict[str, str], dict[str, int], dict]:
    """What an earlier, interrupted transfer left: verified files (kept only if their sha256 still
    matches), and .part prefixes to resume, with their hash state so far."""
    if key is not None:
        return _scan_sealed_partial(partial, manifest, key)
    files = manifest.files
    image = partial / "image"
    have: dict[str, str] = {}
    resume: dict[str, int] = {}
    hashers: dict[str, Any] = {}
    for entry, p in image_entries(image):
        rel, is_part = (entry[:-5], True) if entry.endswith(".part") else (entry, False)
        meta = files.get(rel)
        if meta is None or not p.is_file():
            _remove(p)
            continue
        size = p.stat().st_size
        if not is_part:
            if size == meta.size and sha256_file(p).hexdigest() == meta.sha256:
                have[rel] = meta.sha256
            else:
                _remove(p)
        elif 0 < size < meta.size and not (image / rel).exists():
            hashers[rel] = sha256_file(p)
            resume[rel] = size
        else:
            _remove(p)
    return have, resume, hashers


def _scan_sealed_partial(partial: Path, manifest: Manifest,
                         key: ImageKey) -> tuple[dict[str, str], dict[str, int], dict]:
    """_scan_partial of an encrypted store: files and .part prefixes are decrypted to be checked
    (a chunk that fails authentication drops its file); a .part keeps its whole chunks only."""
    received = Template(manifest.name, partial, manifest, key=key)
    step = imagecrypt.CHUNK + imagecrypt.NONCE + imagecrypt.TAG
    have: dict[str, str] = {}
    resume: dict[str, int] = {}
    hashers: dict[str, Any] = {}
    image = partial / "image"
    for entry, p in image_entries(image):
        rel, is_part = (entry[:-5], True) if entry.endswith(".part") else (entry, False)
        meta = manifest.files.get(rel)
        if meta is None or not p.is_file():
            _remove(p)
            continue
        try:
            if not is_part:
                if p.stat().st_size == received.stored_size(meta) and \
                        received.digest(rel).hexdigest() == meta.sha256:
                    have[rel] = meta.sha256
                    continue
            elif not (image / rel).exists():
                whole = (p.stat().st_size - imagecrypt.HEADER.size) // step
                if 0 < whole and whole * imagecrypt.CHUNK < meta.size:
                    os.truncate(p, imagecrypt.HEADER.size + whole * step)  # a torn last chunk
                    hashers[rel] = imagecrypt.plain_digest(key, p, rel, meta.size, manifest.name,
                                                           chunks=whole)
                    resume[rel] = whole * imagecrypt.CHUNK
                    continue
        except TemplateCorrupt:
            pass
        _remove(p)
    return have, resume, hashers


def _remove(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
        p.unlink()


@contextlib.asynccontextmanager
async def _partial_lock(store: Store, name: str, wait: float):
    """One receiver per template name at a time (two would write the same partial dir)."""
    root = store.root / ".partial"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / f".lock-{name}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TransferError(f"another transfer of {name!r} is still running") from None
                await asyncio.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock
