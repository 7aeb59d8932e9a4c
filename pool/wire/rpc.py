"""The asyncio RPC layer: a server dispatching requests to one async handler, and clients.

Works on the default loop and on uvloop. Per connection the server reads frames, runs each request as
its own task (pipelining; at most max_inflight_per_conn at once, then it stops reading) and writes
replies through one lock. End of stream from a client means it is gone: its in-flight requests are
cancelled, so a client must keep its side open until it has its replies (no half-close).

TCP is mutual TLS (pool/wire/tls.py): a server given TlsFiles completes the handshake before its
connection handler runs, so a peer without a certificate of the cluster's CA never gets a frame read;
a client names the node it expects (server_name) and fails with TlsError if the certificate does not
say so. Plain TCP only when asked for by name (insecure_plain_tcp), for tests and local development:
the hello's token then travels in clear.
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import socket
import ssl
import stat
import struct
import sys
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from pool import fds
from pool.errors import (BadRequest, InternalError, NoCapacity, NodeUnavailable, NoReply, PoolError,
                         PoolTimeout, ProtocolError, SpecError)
from pool.wire import protocol as P
from pool.wire.tls import TlsFiles, closed_in_handshake, handshake_error, peer_name

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
CLOSE_TIMEOUT = 1.0          # how long a closing connection may take to flush before it is aborted
BACKLOG = 1024               # pending connects; past it a client's non-blocking connect fails (EAGAIN)
TLS_HANDSHAKE_TIMEOUT = 10.0


@dataclass
class ConnContext:
    id: int
    transport: str            # "unix" or "tcp"
    peer: str                 # "host:port" for tcp, "pid=N uid=N" for unix
    pid: int | None = None    # unix peer credentials (SO_PEERCRED), None on tcp
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()  # the unix peer's supplementary groups (SO_PEERGROUPS)
    client: str = ""          # the name the client gave in its hello
    cert_name: str = ""       # tcp over TLS: the node name in the client's (verified) certificate


Handler = Callable[[str, dict, ConnContext], Awaitable[Any]]


class _FrameStream:
    """Frames from a StreamReader. Reads in bounded chunks, so at most one frame plus a chunk is held."""

    def __init__(self, reader: asyncio.StreamReader, max_frame: int) -> None:
        self._reader = reader
        self.decoder = P.FrameDecoder(max_frame)
        self._ready: deque[dict] = deque()

    async def read(self) -> dict | None:
        """The next frame; None at a clean end of stream. ProtocolError on bad bytes."""
        while not self._ready:
            try:
                data = await self._reader.read(READ_CHUNK)
            except ConnectionError:
                data = b""
            if not data:
                if self.decoder.pending:
                    raise ProtocolError("connection closed in the middle of a frame")
                return None
            self._ready.extend(self.decoder.feed(data))
        return self._ready.popleft()


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        writer.transport.abort()  # the peer is not reading; don't wait for it
    except BaseException:
        writer.transport.abort()
        raise


def _peer_info(writer: asyncio.StreamWriter, transport: str) -> dict[str, Any]:
    sock = writer.get_extra_info("socket")
    if transport == "tcp":
        addr = writer.get_extra_info("peername") or ("?", 0)
        name = peer_name(writer.get_extra_info("peercert"))
        return {"peer": f"{addr[0]}:{addr[1]}" + (f" ({name})" if name else ""), "cert_name": name}
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
    except (OSError, AttributeError):
        return {"peer": "unix"}
    return {"peer": f"pid={pid} uid={uid}", "pid": pid, "uid": uid, "gid": gid,
            "groups": _peer_groups(sock)}


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; Python has no constant for it
MAX_GROUPS = 65536


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The unix peer's supplementary groups as the kernel recorded them at connect."""
    size = 64 * 4
    while size <= MAX_GROUPS * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:  # more groups than fit: ask again with room for them
                size *= 4
                continue
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw)
    return ()


class RpcServer:
    def __init__(self, handler: Handler, *, tokens: set[str] | None = None,
                 max_frame: int = P.MAX_FRAME, max_inflight_per_conn: int = 64,
                 request_timeout: float | None = None, hello_timeout: float = 5.0,
                 max_connections: int = 1024, idle_timeout: float | None = 300.0,
                 name: str = "prewarm-pool") -> None:
        tokens = set(tokens or ())
        if any(not isinstance(t, str) or not t for t in tokens):
            raise ValueError("tokens must be non-empty strings")
        self._handler = handler
        self._tokens = tokens
        self._max_frame = max_frame
        self._max_inflight = max_inflight_per_conn
        self._request_timeout = request_timeout
        self._hello_timeout = hello_timeout
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout  # after the hello, with no request in flight; None: never
        self.refused = 0                   # connections turned away at max_connections
        self._name = name
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[tuple[Path, int, int]] = []  # path, st_dev, st_ino of our socket
        self._conns: dict[int, asyncio.Task] = {}
        self._requests: set[asyncio.Task] = set()  # all connections' in-flight requests, for close()
        self._conn_ids = itertools.count(1)
        self._closing = False

    @property
    def connections(self) -> int:
        return len(self._conns)

    # --- listening -------------------------------------------------------------------------------
    async def start_unix(self, path: str | os.PathLike, mode: int = 0o660) -> Path:
        path = Path(path)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _refuse_if_live(path)
        # Bind under a temporary name, chmod, then rename into place: the socket never exists at
        # `path` with umask permissions, and a stale socket is replaced atomically.
        tmp = path.with_name(f".tmp{os.getpid()}")  # short: sun_path has 108 bytes
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, mode)
            sock.listen(BACKLOG)
            os.rename(tmp, path)
        except BaseException:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise
        st = path.stat()
        self._unix_paths.append((path, st.st_dev, st.st_ino))
        self._servers.append(await asyncio.start_unix_server(
            lambda r, w: self._on_connect(r, w, "unix"), sock=sock))
        return path

    async def serve_unix_socket(self, sock: socket.socket) -> Path:
        """Serve a unix stream socket someone else bound and listens on (systemd's socket
        activation). Its file is not ours: close() leaves it, so the next start is handed it again
        and connections queued meanwhile are served."""
        # Python 3.13's loop would unlink the socket file on close unless told not to (uvloop never
        # does, and 3.11's loop has no such argument)
        keep_file = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}
        self._servers.append(await asyncio.start_unix_server(
            lambda r, w: self._on_connect(r, w, "unix"), sock=sock, **keep_file))
        return Path(sock.getsockname())

    async def start_tcp(self, host: str, port: int, *, tls: TlsFiles | None = None,
                        insecure_plain_tcp: bool = False) -> tuple[str, int]:
        """Listen with mutual TLS (tls), or in clear only if insecure_plain_tcp says so.
        Returns the bound address (useful with port 0)."""
        if not self._tokens:
            raise ValueError("refusing to listen on TCP without authentication: "
                             "configure at least one token (RpcServer(tokens=...))")
        if tls is None and not insecure_plain_tcp:
            raise ValueError("refusing to listen on TCP without TLS: give TLS files (--tls-dir), "
                             "or insecure_plain_tcp for tests and local development")
        if tls is None:
            log.warning("rpc: listening on %s:%d in PLAIN TCP: tokens and data travel in clear "
                        "(insecure plain TCP, for tests and local development only)", host, port)
        server = await asyncio.start_server(
            lambda r, w: self._on_connect(r, w, "tcp"), host, port, backlog=BACKLOG,
            ssl=tls.server_context() if tls else None,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls else None)
        self._servers.append(server)
        return server.sockets[0].getsockname()[:2]

    def stop_accepting(self) -> None:
        """Refuse new connections from now on; open connections and their requests carry on
        (a graceful drain). close() finishes the job."""
        self._closing = True
        for server in self._servers:
            server.close()

    async def close(self) -> None:
        """Stop accepting, cancel every connection (and its requests), remove our socket files."""
        self._closing = True
        for server in self._servers:
            server.close()
        conns = list(self._conns.values())
        for task in conns:
            task.cancel()
        await asyncio.gather(*conns, return_exceptions=True)
        for task in list(self._requests):  # normally gone with their connection already
            task.cancel()
        await asyncio.gather(*self._requests, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path, dev, ino in self._unix_paths:
            try:
                st = path.lstat()
                if (st.st_dev, st.st_ino) == (dev, ino):  # don't remove a successor's socket
                    path.unlink()
            except FileNotFoundError:
                pass
        self._unix_paths.clear()

    # --- one connection ----------------------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          transport: str) -> None:
        if self._closing:
            writer.transport.abort()
            return
        if len(self._conns) >= self._max_connections:
            await self._refuse(reader, writer, transport)
            return
        ctx = ConnContext(next(self._conn_ids), transport, **_peer_info(writer, transport))
        self._conns[ctx.id] = asyncio.current_task()
        try:
            await self._serve(reader, writer, ctx)
        except asyncio.CancelledError:
            pass  # server closing; the task ends normally so nothing is reported
        except Exception:
            log.exception("rpc connection %d (%s) failed", ctx.id, ctx.peer)
        finally:
            del self._conns[ctx.id]
            await _close_writer(writer)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      transport: str) -> None:
        """At the cap: one error frame, then close. The client's hello is read (not parsed) first:
        closing with unread data would reset the connection and lose the error frame."""
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:  # a flood must not flood the log too
            log.warning("rpc: refusing %s connections: %d open (max_connections); %d refused so far",
                        transport, len(self._conns), self.refused)
        err = NoCapacity(f"the service has {len(self._conns)} connections open, its limit "
                         "([service] max_connections); try again later",
                         connections=len(self._conns), limit=self._max_connections)
        try:
            writer.write(P.encode_frame(P.make_error(0, err)))
            await asyncio.wait_for(reader.read(P.HELLO_MAX_FRAME), CLOSE_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        await _close_writer(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     ctx: ConnContext) -> None:
        lock = asyncio.Lock()

        async def send(frame: bytes) -> None:
            async with lock:
                if writer.is_closing():
                    return  # the peer left; writing more would only make asyncio log warnings
                try:
                    writer.write(frame)
                    await writer.drain()
                except ConnectionError:
                    writer.transport.abort()  # the reader side notices and cleans up

        frames = _FrameStream(reader, min(P.HELLO_MAX_FRAME, self._max_frame))
        try:
            hello = await asyncio.wait_for(frames.read(), self._hello_timeout)
            if hello is None:
                return
            ctx.client = P.check_hello(hello, self._tokens)
        except asyncio.TimeoutError:
            await send(P.encode_frame(P.make_error(0, ProtocolError("no hello received in time"))))
            return
        except PoolError as e:  # the refusal is the only thing an unauthenticated peer gets
            log.info("rpc connection %d (%s) refused: %s", ctx.id, ctx.peer, e.message)
            await send(P.encode_frame(P.make_error(0, e)))
            return
        await send(P.encode_frame(P.make_hello_reply(self._name)))
        frames.decoder.max_frame = self._max_frame

        try:
            await self._serve_requests(frames, send, ctx)
        except TimeoutError:
            log.debug("rpc connection %d (%s) idle for %g s: closing it",  # routine: not worth a line each
                      ctx.id, ctx.peer, self._idle_timeout)
            await send(P.encode_frame(P.make_error(0, ProtocolError(
                f"connection idle for {self._idle_timeout:g} s: closed by the server",
                idle_timeout=self._idle_timeout))))

    async def _serve_requests(self, frames: _FrameStream, send: Callable[[bytes], Awaitable[None]],
                              ctx: ConnContext) -> None:
        """Read and run requests until the client leaves or errs. TimeoutError once the connection
        has had no request in flight for idle_timeout seconds."""
        inflight: set[asyncio.Task] = set()
        slots = asyncio.Semaphore(self._max_inflight)
        loop = asyncio.get_running_loop()
        watching = True  # idle.reschedule() may only be called inside its `async with`

        def rearm_idle() -> None:
            if watching and self._idle_timeout is not None and not idle.expired():
                idle.reschedule(None if inflight else loop.time() + self._idle_timeout)

        def done(task: asyncio.Task) -> None:
            inflight.discard(task)
            self._requests.discard(task)
            slots.release()
            rearm_idle()

        try:
            async with asyncio.timeout(None) as idle:
                rearm_idle()
                while True:
                    try:
                        msg = await frames.read()
                        if msg is None:
                            break
                        req = P.validate_request(msg)
                    except ProtocolError as e:
                        log.info("rpc connection %d (%s): %s", ctx.id, ctx.peer, e.message)
                        await send(P.encode_frame(P.make_error(0, e)))
                        break
                    except BadRequest as e:  # the envelope, so msg["id"], was valid
                        await send(self._encode_reply(P.make_error(msg["id"], e), msg["id"]))
                        continue
                    await slots.acquire()  # back-pressure: no more reading until a slot frees up
                    task = asyncio.create_task(self._run(req, ctx, send))
                    inflight.add(task)
                    self._requests.add(task)
                    task.add_done_callback(done)
                    rearm_idle()
        finally:
            watching = False
            # The client is gone (or sent garbage, or idled, or we are closing): its requests are moot.
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    async def _run(self, req: P.Request, ctx: ConnContext, send: Callable[[bytes], Awaitable[None]]) -> None:
        try:
            async with asyncio.timeout(self._request_timeout) as deadline:
                result = await self._handler(req.method, req.params, ctx)
            reply = P.make_result(req.id, result)
        except PoolError as e:
            reply = P.make_error(req.id, e)
        except asyncio.TimeoutError as e:
            if not deadline.expired():  # raised by the handler itself: a bug like any other
                reply = self._internal(req, ctx, e)
            else:
                reply = P.make_error(req.id, PoolTimeout(
                    f"{req.method} did not finish within {self._request_timeout} s",
                    method=req.method, timeout=self._request_timeout))
        except Exception as e:
            reply = self._internal(req, ctx, e)
        await send(self._encode_reply(reply, req.id))

    def _internal(self, req: P.Request, ctx: ConnContext, e: Exception) -> dict:
        log.error("rpc handler failed: %s from %s", req.method, ctx.peer, exc_info=e)
        return P.make_error(req.id, InternalError(f"internal error in {req.method}: {type(e).__name__}: {e}",
                                                  method=req.method))

    def _encode_reply(self, reply: dict, rid: int) -> bytes:
        """Unencodable or too large replies still get an answer: an error keeps its type and loses
        its data; a result becomes an internal error."""
        try:
            return P.encode_frame(reply, self._max_frame)
        except ProtocolError as e:
            log.error("rpc reply to request %d cannot be sent: %s", rid, e.message)
            problem = e.message
        if "error" in reply:
            try:
                return P.encode_frame({"id": rid, "error": {**reply["error"], "data": {}}}, self._max_frame)
            except ProtocolError:
                pass
        return P.encode_frame(P.make_error(rid, InternalError(f"reply cannot be sent: {problem[:200]}")))


SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the sockets systemd passes start at this fd


def systemd_listen_socket() -> socket.socket | None:
    """The listening unix socket systemd passed us (socket activation, the sd_listen_fds protocol:
    LISTEN_PID is our pid, LISTEN_FDS the number of fds, from fd 3 on), or None if none was passed.
    The variables are removed either way, so that no child (CRIU, a copy) sees them, and the fd is
    made close-on-exec. SpecError if what was passed is not one listening unix stream socket."""
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None or pid != str(os.getpid()):
        return None  # none, or meant for the process that exec'd us
    if count != "1":
        raise SpecError("environment", "LISTEN_FDS",
                        f"{count!r}: the service takes exactly one socket (ListenStream= the unix "
                        "socket's path, in its .socket unit)")
    fd = SD_LISTEN_FDS_START
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise SpecError("environment", "LISTEN_FDS", f"fd {fd} is not a socket") from e
    if (sock.family, sock.type) != (socket.AF_UNIX, socket.SOCK_STREAM) \
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.close()
        raise SpecError("environment", "LISTEN_FDS",
                        f"fd {fd} is not a listening unix stream socket (ListenStream=PATH)")
    return sock


def _refuse_if_live(path: Path) -> None:
    """A socket file nobody listens on is stale and may go; a live one or a non-socket may not."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return  # refused: stale
    finally:
        probe.close()
    raise FileExistsError(f"another server is listening on {path}")


# --- clients -------------------------------------------------------------------------------------------
class RpcClient:
    """One connection; concurrent calls are matched to replies by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame: int = P.MAX_FRAME) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = _FrameStream(reader, max_frame)
        self._max_frame = max_frame
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._reader_task: asyncio.Task | None = None
        self._closed: PoolError | None = None  # why the connection is unusable, once it is
        self.server = ""

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike, token: str | None = None, *,
                           timeout: float = 5.0, client: str = "pool-client") -> RpcClient:
        return await cls._connect(str(path), lambda: asyncio.open_unix_connection(str(path)),
                                  token, timeout, client)

    @classmethod
    async def connect_tcp(cls, host: str, port: int, token: str, *, tls: TlsFiles | None = None,
                          server_name: str | None = None, insecure_plain_tcp: bool = False,
                          timeout: float = 5.0, client: str = "pool-client") -> RpcClient:
        """Over mutual TLS the server's certificate must name server_name (TlsError otherwise);
        without tls only if insecure_plain_tcp says so (the token then travels in clear)."""
        open_ = open_tcp(host, port, tls, server_name, insecure_plain_tcp)
        return await cls._connect(f"{host}:{port}", open_, token, timeout, client, server_name)

    @classmethod
    async def _connect(cls, where: str, open_: Callable[[], Awaitable[tuple]], token: str | None,
                       timeout: float, client: str, server_name: str | None = None) -> RpcClient:
        """Unreachable or silent servers become NodeUnavailable; refusals keep their own type."""
        async def go() -> RpcClient:
            reader, writer = await open_()
            return await cls(reader, writer)._handshake(token, client)
        try:
            return await asyncio.wait_for(go(), timeout)
        except asyncio.TimeoutError:
            raise NodeUnavailable(f"no answer from {where} within {timeout} s", address=where) from None
        except (ssl.SSLError, ssl.CertificateError) as e:  # before OSError: SSLError is one
            raise handshake_error(e, where, server_name) from e
        except ProtocolError as e:
            if server_name is not None and e.data.get("during") == "hello":
                raise closed_in_handshake(where, server_name) from e
            raise
        except OSError as e:
            raise NodeUnavailable(f"cannot connect to {where}: {e}", address=where) from e

    async def _handshake(self, token: str | None, client: str) -> RpcClient:
        try:
            self._writer.write(P.encode_frame(P.make_hello(token, client)))
            await self._writer.drain()
            reply = await self._frames.read()
            if reply is None:
                raise ProtocolError("connection closed during hello", during="hello")
            self.server = P.check_hello_reply(reply)
        except BaseException:
            self._writer.transport.abort()
            raise
        self._reader_task = asyncio.create_task(self._read_replies())
        return self

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def closed_as_idle(self) -> bool:
        """True if the server closed this connection for being idle; a request sent then was never
        run, so a caller may reconnect and send it again. Whatever the server said while no call was
        pending (its idle notice) is taken in first: a blocking client's loop was not running then."""
        if not self._closed and not self._pending and self._reader_task is not None \
                and _readable(self._writer):
            await asyncio.wait([self._reader_task], timeout=CLOSE_TIMEOUT)  # it ends at the close
        return idle_close(self._closed)

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        if self._closed:
            raise ProtocolError(f"connection closed: {self._closed.message}")
        rid = next(self._ids)
        frame = P.encode_frame(P.make_request(rid, method, params), self._max_frame)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            # The deadline covers the write too: a server may stop reading.
            async with asyncio.timeout(timeout) as deadline:
                async with self._lock:
                    self._writer.write(frame)
                    await self._writer.drain()
                return await fut
        except TimeoutError:
            if not deadline.expired():
                raise  # the server's own reply: a PoolTimeout (a TimeoutError too)
            raise NoReply(f"{method} got no reply within {timeout} s",
                          method=method, timeout=timeout) from None
        except ConnectionError as e:
            self._fail(ProtocolError(f"connection closed: {e}"))
            raise self._closed from None
        finally:
            self._pending.pop(rid, None)  # a late reply is then dropped

    async def _read_replies(self) -> None:
        why = ProtocolError("connection closed")
        try:
            while True:
                msg = await self._frames.read()
                if msg is None:
                    break
                reply = P.parse_reply(msg)
                if reply.id == 0 and reply.error is not None:  # about the connection: it is over
                    why = reply.error
                    break
                fut = self._pending.get(reply.id)
                if fut is None or fut.done():
                    continue  # its caller timed out or was cancelled
                if reply.error is not None:
                    fut.set_exception(reply.error)
                else:
                    fut.set_result(reply.result)
        except ProtocolError as e:
            why = e
        except asyncio.CancelledError:
            why = ProtocolError("connection closed by this client")
            raise
        finally:
            self._fail(why)
            self._writer.transport.abort()

    def _fail(self, why: PoolError) -> None:
        if self._closed is None:
            self._closed = why
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(why)
                # Pending callers get it; this keeps "exception never retrieved" out of the log
                # for callers that were cancelled at the same moment.
                fut.exception()
        self._pending.clear()

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._fail(ProtocolError("connection closed by this client"))
        await _close_writer(self._writer)

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def open_tcp(host: str, port: int, tls: TlsFiles | None, server_name: str | None,
             insecure_plain_tcp: bool, **kw: Any) -> Callable[[], Awaitable[tuple]]:
    """A TCP connect (asyncio.open_connection) over mutual TLS, or plain when allowed by name."""
    if tls is None:
        if not insecure_plain_tcp:
            raise ValueError("refusing to connect over TCP without TLS: give TLS files, "
                             "or insecure_plain_tcp for tests and local development")
        return lambda: asyncio.open_connection(host, port, **kw)
    if not server_name:
        raise ValueError("a TLS connection needs the server's node name (server_name)")
    ctx = tls.client_context()
    return lambda: asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_name,
                                           ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT, **kw)


def idle_close(err: BaseException | None) -> bool:
    """Is err the server's notice that it closed an idle connection (see RpcServer idle_timeout)?"""
    return isinstance(err, ProtocolError) and "idle_timeout" in err.data


def _readable(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    try:
        return sock is not None and fds.readable(sock.fileno(), 0)
    except (OSError, ValueError):  # already closed
        return True


class SyncRpcClient:
    """Blocking wrapper: a private event loop run in the calling thread for each call.
    Not usable from inside a running event loop.

    Closed by close(), and else when it is garbage-collected or the interpreter exits (weakref.finalize):
    a loop left to the GC would destroy the pending reply reader and print tracebacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: RpcClient) -> None:
        self._loop = loop
        self._client = client
        self._finalizer = weakref.finalize(self, _close_sync, loop, client, os.getpid())

    @classmethod
    def _open(cls, connect: Callable[[], Awaitable[RpcClient]]) -> SyncRpcClient:
        loop = asyncio.new_event_loop()
        try:
            return cls(loop, loop.run_until_complete(connect()))
        except BaseException:
            loop.close()
            raise

    @classmethod
    def connect_unix(cls, path: str | os.PathLike, token: str | None = None, *,
                     timeout: float = 5.0, client: str = "pool-client") -> SyncRpcClient:
        return cls._open(lambda: RpcClient.connect_unix(path, token, timeout=timeout, client=client))

    @classmethod
    def connect_tcp(cls, host: str, port: int, token: str, *, tls: TlsFiles | None = None,
                    server_name: str | None = None, insecure_plain_tcp: bool = False,
                    timeout: float = 5.0, client: str = "pool-client") -> SyncRpcClient:
        return cls._open(lambda: RpcClient.connect_tcp(
            host, port, token, tls=tls, server_name=server_name,
            insecure_plain_tcp=insecure_plain_tcp, timeout=timeout, client=client))

    @property
    def server(self) -> str:
        return self._client.server

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        if self._loop.is_closed():
            raise ProtocolError("connection closed by this client")
        return self._loop.run_until_complete(self._client.call(method, params, timeout))

    def closed_as_idle(self) -> bool:
        return not self._loop.is_closed() and self._loop.run_until_complete(self._client.closed_as_idle())

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> SyncRpcClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _close_sync(loop: asyncio.AbstractEventLoop, client: RpcClient, pid: int) -> None:
    """SyncRpcClient's finalizer: close the connection on its own loop, then the loop."""
    if loop.is_closed() or os.getpid() != pid:
        return  # a forked child shares the parent's epoll instance: running our loop would disturb it
    try:
        if _loop_runs_here():
            # Collected inside another loop's callback, where ours cannot run: run it in a thread.
            t = threading.Thread(target=loop.run_until_complete, args=(client.close(),))
            t.start()
            t.join()
        else:
            loop.run_until_complete(client.close())
    finally:
        loop.close()


def _loop_runs_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
