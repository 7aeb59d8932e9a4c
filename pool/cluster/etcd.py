"""A small etcd v3 client over etcd's HTTP/JSON gateway (`/v3/...`, etcd 3.4+), on asyncio streams.

Only what the cluster state needs: range, put, delete, txn (compare-and-put), leases (grant,
keepalive, revoke, time-to-live), the member list and watch (a streaming response: one JSON object
per event batch). Keys and values are bytes on the wire (base64 in JSON); here they are str.

Each unary call is one HTTP/1.1 request on a fresh connection (loopback or LAN: a connect costs
less than the request itself, and no pooled connection can go stale across an etcd restart). With
several endpoints, a call that cannot reach one tries the next; when none answers it raises
NodeUnavailable naming every endpoint. An error etcd answers (a lease that does not exist, a
malformed request) is NodeUnavailable too, with etcd's message, since the cluster state cannot be
read or written; a compare-and-put that loses is not an error here: txn() says whether it won.

etcd itself is reached in clear on the gateway; securing it (client certificates, an https://
endpoint) is docs/nodes.md's "A cluster on etcd".
"""
from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pool.errors import NodeUnavailable

CALL_TIMEOUT = 5.0


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str | None) -> str:
    return base64.b64decode(text or "").decode(errors="replace")


def prefix_end(prefix: str) -> str:
    """The range_end that makes a range of every key starting with prefix (etcd's convention)."""
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return base64.b64encode(bytes(raw[:i + 1])).decode()
    return base64.b64encode(b"\0").decode()   # every key


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int                      # 0: no lease

    @classmethod
    def from_json(cls, kv: dict) -> "KeyValue":
        return cls(unb64(kv.get("key")), unb64(kv.get("value")), int(kv.get("create_revision", 0)),
                   int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))


@dataclass(frozen=True)
class Event:
    kind: str                       # "put" | "delete"
    kv: KeyValue


@dataclass(frozen=True)
class Endpoint:
    url: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        u = urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"{url!r} is not an etcd endpoint (http://HOST:PORT)")
        return cls(f"http://{u.hostname}:{u.port or 2379}", u.hostname, u.port or 2379)


def parse_endpoints(text: str | list[str]) -> list[Endpoint]:
    """"URL[,URL...]" (or a list) into endpoints; ValueError names the one that is not a URL."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = [Endpoint.parse(u.strip()) for u in items if u.strip()]
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


class Etcd:
    """One etcd cluster, by its client endpoints. sock_factory (tests) makes the unconnected TCP
    socket each request uses, e.g. one that lives in another network namespace."""

    def __init__(self, endpoints: list[Endpoint], timeout: float = CALL_TIMEOUT,
                 sock_factory: Callable[[], socket.socket] | None = None) -> None:
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._sock_factory = sock_factory
        self._good = 0                   # the endpoint that answered last: tried first

    @property
    def where(self) -> str:
        return ", ".join(e.url for e in self.endpoints)

    # -- transport --------------------------------------------------------------------------------
    async def _open(self, ep: Endpoint):
        if self._sock_factory is None:
            return await asyncio.open_connection(ep.host, ep.port)
        sock = self._sock_factory()
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (ep.host, ep.port))
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    async def _request(self, path: str, body: dict, ep: Endpoint):
        """Send one POST; the open streams, past the status line and headers."""
        reader, writer = await self._open(ep)
        try:
            data = json.dumps(body).encode()
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {ep.host}:{ep.port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                         "Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
            status = await reader.readline()
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            parts = status.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise ConnectionResetError(f"no HTTP reply from {ep.url}")
            return reader, writer, int(parts[1]), headers
        except BaseException:
            writer.close()
            raise

    async def _body(self, reader: asyncio.StreamReader, headers: dict) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while chunk := await _read_chunk(reader):
                out += chunk
            return out
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"]))
        return await reader.read()

    async def call(self, path: str, body: dict) -> dict:
        """POST body to path on the first endpoint that answers; etcd's JSON reply."""
        errors = []
        n = len(self.endpoints)
        for i in range(n):
            ep = self.endpoints[(self._good + i) % n]
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer, status, headers = await self._request(path, body, ep)
                    try:
                        raw = await self._body(reader, headers)
                    finally:
                        writer.close()
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                errors.append(f"{ep.url}: {e.strerror or e}" if isinstance(e, OSError) and e.strerror
                              else f"{ep.url}: {type(e).__name__} {e}".rstrip())
                continue
            self._good = (self._good + i) % n
            reply = _json(raw, ep)
            if status != 200 or "error" in reply and "result" not in reply:
                reply = reply.get("error", reply) if isinstance(reply.get("error"), dict) else reply
                raise NodeUnavailable(f"etcd at {ep.url} refused {path}: "
                                      f"{reply.get('message') or reply.get('error') or status}",
                                      endpoint=ep.url, etcd_code=reply.get("code"))
            return reply.get("result", reply) if path in STREAMED else reply
        raise NodeUnavailable(f"etcd is unavailable ({'; '.join(errors)})", endpoint=self.where)

    # -- keys -------------------------------------------------------------------------------------
    async def range(self, key: str, prefix: bool = False) -> tuple[list[KeyValue], int]:
        """The key (or every key under prefix) and the store's revision."""
        body = {"key": b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        r = await self.call("/v3/kv/range", body)
        return [KeyValue.from_json(kv) for kv in r.get("kvs", [])], int(r["header"]["revision"])

    async def get(self, key: str) -> KeyValue | None:
        kvs, _ = await self.range(key)
        return kvs[0] if kvs else None

    async def put(self, key: str, value: str, lease: int = 0) -> int:
        r = await self.call("/v3/kv/put", _put(key, value, lease))
        return int(r["header"]["revision"])

    async def delete(self, key: str, prefix: bool = False) -> int:
        body = {"key": b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        r = await self.call("/v3/kv/deleterange", body)
        return int(r.get("deleted", 0))

    async def create(self, key: str, value: str,
                     lease: int = 0) -> tuple[bool, KeyValue | None, int]:
        """Put key only if it does not exist (one txn): (True, None, its create revision) if this
        call created it, else (False, the key as it is (None if it just went), the revision)."""
        r = await self.call("/v3/kv/txn", {
            "compare": [{"key": b64(key), "target": "CREATE", "result": "EQUAL",
                         "create_revision": "0"}],
            "success": [{"request_put": _put(key, value, lease)}],
            "failure": [{"request_range": {"key": b64(key)}}]})
        rev = int(r["header"]["revision"])
        if r.get("succeeded"):
            return True, None, rev
        kvs = r["responses"][0]["response_range"].get("kvs", [])
        return False, KeyValue.from_json(kvs[0]) if kvs else None, rev

    async def delete_if(self, key: str, create_revision: int) -> bool:
        """Delete key only if it is still the one created at create_revision (one txn)."""
        r = await self.call("/v3/kv/txn", {
            "compare": [{"key": b64(key), "target": "CREATE", "result": "EQUAL",
                         "create_revision": str(create_revision)}],
            "success": [{"request_delete_range": {"key": b64(key)}}]})
        return bool(r.get("succeeded"))

    # -- leases -----------------------------------------------------------------------------------
    async def grant(self, ttl: int) -> int:
        r = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(r["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew lease once; its TTL now, 0 if it no longer exists (expired or revoked)."""
        r = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(r.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    async def time_to_live(self, lease: int) -> tuple[int, int]:
        """(seconds left, granted TTL); (-1, 0) for a lease that does not exist."""
        r = await self.call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(r.get("TTL", -1)), int(r.get("grantedTTL", 0))

    async def members(self) -> list[dict]:
        r = await self.call("/v3/cluster/member/list", {})
        return [{"name": m.get("name", ""), "id": m.get("ID"), "client_urls": m.get("clientURLs", []),
                 "learner": bool(m.get("isLearner"))} for m in r.get("members", [])]

    # -- watch ------------------------------------------------------------------------------------
    async def watch(self, key: str, start_revision: int, prefix: bool = False) -> AsyncIterator[Event]:
        """Every change to key (or under prefix) from start_revision on, until the stream breaks:
        NodeUnavailable then (etcd gone, or the revision compacted away); the caller re-reads
        and watches again."""
        req = {"key": b64(key), "start_revision": str(start_revision)}
        if prefix:
            req["range_end"] = prefix_end(key)
        ep = self.endpoints[self._good]
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer, status, headers = await self._request(
                    "/v3/watch", {"create_request": req}, ep)
        except (OSError, TimeoutError) as e:
            raise NodeUnavailable(f"etcd at {ep.url} is unavailable for a watch: {e}",
                                  endpoint=ep.url) from e
        try:
            if status != 200:
                raise NodeUnavailable(f"etcd at {ep.url} refused a watch (HTTP {status})",
                                      endpoint=ep.url)
            decoder, buf = json.JSONDecoder(), ""
            while True:
                try:
                    chunk = await _read_chunk(reader)
                except (OSError, asyncio.IncompleteReadError) as e:
                    raise NodeUnavailable(f"etcd at {ep.url} ended a watch: {e}",
                                          endpoint=ep.url) from e
                if not chunk:
                    raise NodeUnavailable(f"etcd at {ep.url} ended a watch", endpoint=ep.url)
                buf += chunk.decode()
                while buf.strip():
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break       # the rest of this object is in the next chunk
                    buf = buf.lstrip()[end:]
                    result = msg.get("result") or {}
                    if "error" in msg or result.get("canceled") or result.get("compact_revision"):
                        raise NodeUnavailable(f"etcd at {ep.url} cancelled a watch: "
                                              f"{msg.get('error') or result}", endpoint=ep.url)
                    for ev in result.get("events", []):
                        yield Event("delete" if ev.get("type") == "DELETE" else "put",
                                    KeyValue.from_json(ev["kv"]))
        finally:
            writer.close()


STREAMED = ("/v3/lease/keepalive",)   # gateway stream replies: {"result": {...}}


def _put(key: str, value: str, lease: int) -> dict:
    body = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return body


def _json(raw: bytes, ep: Endpoint) -> dict:
    try:
        text = raw.decode().strip().splitlines()[0] if raw.strip() else "{}"
        return json.loads(text)
    except (ValueError, IndexError) as e:
        raise NodeUnavailable(f"etcd at {ep.url} sent a reply that is not JSON: {raw[:200]!r}",
                              endpoint=ep.url) from e


async def _read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body; b"" at its end."""
    size_line = await reader.readline()
    if not size_line:
        return b""
    size = int(size_line.split(b";")[0].strip() or b"0", 16)
    if size == 0:
        await reader.readline()
        return b""
    data = await reader.readexactly(size)
    await reader.readexactly(2)
    return data
