"""What a coordinator asks of a node beyond spawning: fetch a template from a TemplateSource, and the
two halves of a remote fork (checkpoint a live copy and serve its image; fetch and restore it).

NodeOps wraps a NodeRuntime through its public interface (store, criu, find, run_blocking,
background, adopt_handed, and the node API for everything else); `pool agent` serves it over TCP
and the coordinator's embedded local node calls it directly, so both behave the same.

Fork, eager: the source node dumps the copy without stopping it (fork.checkpoint_instance with
leave_running) into its store as TEMPLATE+fork-RANDOM (store.fork_name), serves it from a one-off TemplateSource with a
one-off token; the target fetches it and restores it with an ordinary spawn (a fresh instance id and
hostname; no SDK channel, so the app keeps its memory state, identity included). Fork, lazy: the
source writes only the small images and serves the memory from a CRIU page server; the target
fetches the small build and restores at once (fork.restore_lazy), pages arriving on demand.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pool.copies import fork
from pool.copies.restore import new_instance_id
from pool.cr import netns
from pool.errors import BadRequest, PoolError, RestoreError, TemplateNotFound
from pool.names import fork_name, parse_hostport
from pool.node.runtime import NodeRuntime
from pool.templates import transfer
from pool.templates.compat import node_facts

log = logging.getLogger(__name__)

FORK_SOURCE_TTL = 300.0       # a fork source nobody released is closed after this long
LAZY_PAGES_TIMEOUT = 300.0    # every page of a lazy restore must have arrived by then


def parse_address(text: str, param: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as e:
        raise BadRequest(str(e), param=param) from None


@dataclass
class _ForkSource:
    name: str
    source: Any                        # transfer.TemplateSource
    lazy: Any = None                   # fork.LazyCheckpoint
    build_dir: Path | None = None      # a lazy build lives outside the store
    timer: asyncio.TimerHandle | None = None
    tasks: set = field(default_factory=set)


class _OneTemplate:
    """A store-like view of one unpublished build (a lazy fork's), for TemplateSource."""

    def __init__(self, template) -> None:
        self.template = template

    def get(self, name: str):
        if name != self.template.name:
            raise TemplateNotFound(name, where="this fork source")
        return self.template


class NodeOps:
    METHODS = ("fetch_template", "fork_checkpoint", "fork_release", "fork_restore",
               # running instances (pool/node/live.py)
               "checkpoint", "snapshots", "rollback", "suspend", "resume",
               "migrate_out", "migrate_in", "migrate_done")

    def __init__(self, runtime: NodeRuntime, *, host: str, token: str | None = None,
                 tls: Any = None) -> None:
        self.runtime = runtime
        self.host = host            # where this node's fork sources and page servers listen
        self.token = token          # this node's own token: presented to a coordinator's source
        self.tls = tls              # pool.wire.tls.TlsFiles: every TCP link and the page server
        runtime.criu.page_server_tls = tls
        self._forks: dict[str, _ForkSource] = {}

    async def handle(self, method: str, params: dict) -> Any:
        if method in self.METHODS:
            return await getattr(self, f"rpc_{method}")(**params)
        return await self.runtime.api.handle(method, params)

    async def close(self) -> None:
        for name in list(self._forks):
            await self.rpc_fork_release(name, abort=True)

    @property
    def store(self):
        return self.runtime.store

    @property
    def criu(self):
        return self.runtime.criu

    # -- templates ----------------------------------------------------------------------------------
    async def rpc_fetch_template(self, name: str, source: str, build_id: str | None = None,
                                 token: str | None = None, timeout: float = 600.0,
                                 source_name: str | None = None) -> dict:
        """Pull a template from a TemplateSource into this node's store (verified, atomic); over
        TLS the source's certificate must name source_name."""
        if self.tls is not None and not source_name:
            raise BadRequest("source_name (the source's node name) is needed over TLS",
                             param="source_name")
        r = await transfer.fetch(self.store, name, parse_address(source, "source"),
                                 token=token or self.token, tls=self.tls, server_name=source_name,
                                 facts=node_facts(self.criu),
                                 build_id=build_id, timeout=timeout)
        log.info("fetched %s (build %s) from %s: %d files, %.1f MB on the wire in %.2fs%s", name,
                 r.template.build_id, source, r.files_sent, r.bytes_wire / 2**20, r.seconds,
                 " (already current)" if r.already_current else "")
        return {"name": name, "build_id": r.template.build_id, "files_sent": r.files_sent,
                "files_reused": r.files_reused, "bytes_raw": r.bytes_raw,
                "bytes_wire": r.bytes_wire, "codec": r.codec, "seconds": round(r.seconds, 4),
                "already_current": r.already_current}

    # -- running instances: pool/node/live.py ---------------------------------------------------------
    async def rpc_checkpoint(self, id: str, tag: str | None = None, keep: bool = False,  # noqa: A002
                             timeout: float = 120.0) -> dict:
        return await self.runtime.live.checkpoint(id, tag, keep, timeout)

    async def rpc_snapshots(self, id: str) -> list:  # noqa: A002
        return self.runtime.live.list(id)

    async def rpc_rollback(self, id: str, snapshot: str | None = None,  # noqa: A002
                           timeout: float = 60.0) -> dict:
        return await self.runtime.live.rollback(id, snapshot, timeout)

    async def rpc_suspend(self, id: str, timeout: float = 120.0) -> dict:  # noqa: A002
        return await self.runtime.live.suspend(id, timeout)

    async def rpc_resume(self, id: str, timeout: float = 60.0) -> dict:  # noqa: A002
        return await self.runtime.live.resume(id, timeout)

    # -- migration: pool/node/live.py keeps the instance; here its snapshot is shipped -------------
    async def rpc_migrate_out(self, id: str, lazy: bool = False,  # noqa: A002
                              timeout: float = 120.0) -> dict:
        """Source: checkpoint the instance, end its process and serve its snapshot to the target
        (a one-off TemplateSource, as a fork's). Lazy: the small images, and the memory from a
        page server, the process frozen here until the target has it all."""
        live = self.runtime.live
        page_server = freeze_ms = ck = build_dir = None
        if lazy:
            forks = Path(self.runtime.settings.run_dir) / "forks"
            forks.mkdir(parents=True, exist_ok=True, mode=0o700)
            build_dir = forks / f"{id}.migrate.{secrets.token_hex(3)}"
            page_server = (self.host, _free_port(self.host))
            ck = await live.migrate_out_lazy(id, build_dir, page_server, LAZY_PAGES_TIMEOUT)
            template = ck.template
        else:
            snap = await live.migrate_out(id, timeout)
            template, freeze_ms = snap.template, snap.freeze_ms
        token = secrets.token_urlsafe(24)
        self._forks[template.name] = _ForkSource(   # registered first: migrate_done releases it
            template.name, transfer.TemplateSource(_OneTemplate(template), tokens={token}, tls=self.tls),
            lazy=ck, build_dir=build_dir)
        try:
            host, port = await self._forks[template.name].source.start(self.host, 0)
        except BaseException:
            await self.rpc_migrate_done(id, moved=False, template=template.name)
            raise
        inst = self.runtime.find(id).inst
        return {"template": template.name, "build_id": template.build_id,
                "source": f"{host}:{port}", "token": token,
                "source_name": self.tls.name if self.tls is not None else None,
                "page_server": f"{page_server[0]}:{page_server[1]}" if page_server else None,
                "image_bytes": template.image_bytes, "freeze_ms": freeze_ms,
                "instance": {"template": inst.template, "hostname": inst.hostname,
                             "owner": inst.owner, "env_keys": inst.env_keys, "args": inst.args,
                             "created": inst.created}}

    async def rpc_migrate_done(self, id: str, moved: bool, template: str,  # noqa: A002
                               timeout: float = 60.0) -> dict:
        """Source: stop serving the snapshot; end the instance here (moved) or resume it."""
        await self.rpc_fork_release(template, abort=not moved)
        await self.runtime.live.migrate_done(id, moved, timeout)
        return {"id": id, "moved": moved}

    async def rpc_migrate_in(self, id: str, template: str, source: str, build_id: str,  # noqa: A002
                             token: str, instance: dict, timeout: float = 60.0,
                             source_name: str | None = None,
                             page_server: str | None = None) -> dict:
        """Target: fetch the snapshot and restore it as instance id (its id, identity and
        owner kept); the fetched build is removed once restored (lazy: once every page is in)."""
        rt = self.runtime
        t0 = time.perf_counter()
        if rt.table.get(id) is not None:
            raise BadRequest(f"instance {id} already runs on node {rt.name}", param="id", id=id)
        await self.rpc_fetch_template(template, source, build_id, token, timeout, source_name)
        if page_server is not None:
            r = await self._restore_lazy(template, parse_address(page_server, "page_server"),
                                         instance.get("hostname"), timeout, iid=id)
            c = rt.find(id)
            c.inst.owner = instance.get("owner")
            c.inst.env_keys = list(instance.get("env_keys") or [])
            c.inst.args = list(instance.get("args") or [])
            c.inst.template = r["template"] = instance.get("template") or template
            rt.write_journal(c)
            return {**r, "path": "migrated"}
        try:
            t = self.store.get(template)
            rt.instances_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            run_dir = rt.instances_dir / f"{id}.{secrets.token_hex(4)}"
            inst = await rt.run_blocking(lambda: fork.restore_copy(t, self.criu, run_dir,
                                                                   instance_id=id, timeout=timeout))
            hostname = instance.get("hostname")
            name_or_end(inst, hostname)
            inst.state, inst.hostname, inst.owner = "running", hostname, instance.get("owner")
            inst.env_keys, inst.args = list(instance.get("env_keys") or []), list(instance.get("args") or [])
            c = await rt.adopt_handed(inst, template, "migrated")
            inst.template = instance.get("template") or template  # as the source knew it
            rt.write_journal(c)
            await rt.live.after_restore(inst)
        finally:
            with contextlib.suppress(PoolError, OSError):
                self.store.remove(template)  # the process has its memory now
        return {"id": id, "template": instance.get("template") or template, "pid": inst.pid,
                "address": inst.address, "path": "migrated", "node": rt.name,
                "spawn_ms": round((time.perf_counter() - t0) * 1000, 3)}

    # -- fork, source side --------------------------------------------------------------------------
    async def rpc_fork_checkpoint(self, id: str, lazy: bool = False,  # noqa: A002
                                  timeout: float = 120.0) -> dict:
        c = self.runtime.find(id)
        if c.exited:
            raise RestoreError("forking the instance", f"instance {id} has exited")
        inst = c.inst
        name = fork_name(inst.template)
        token = secrets.token_urlsafe(24)
        source_manifest = None
        with contextlib.suppress(PoolError):
            t = self.store.get(inst.template)
            if t.build_id == inst.build_id:
                source_manifest = t.manifest
        entry: _ForkSource
        if not lazy:
            template = await self.runtime.run_blocking(
                lambda: fork.checkpoint_instance(inst, self.store, self.criu, name=name,
                                                 source_manifest=source_manifest,
                                                 timeout=timeout))
            src = transfer.TemplateSource(self.store, tokens={token}, tls=self.tls)
            entry = _ForkSource(name, src)
            page_server = None
        else:
            forks = Path(self.runtime.settings.run_dir) / "forks"
            forks.mkdir(parents=True, exist_ok=True, mode=0o700)
            build_dir = forks / f"{name}.{secrets.token_hex(3)}"
            page_server = (self.host, _free_port(self.host))
            ck = await self.runtime.run_blocking(
                lambda: fork.checkpoint_instance_lazy(inst, build_dir, self.criu, page_server,
                                                      leave_running=True, name=name,
                                                      source_manifest=source_manifest,
                                                      timeout=LAZY_PAGES_TIMEOUT))
            template = ck.template
            src = transfer.TemplateSource(_OneTemplate(template), tokens={token}, tls=self.tls)
            entry = _ForkSource(name, src, lazy=ck, build_dir=build_dir)
        old = self._forks.pop(name, None)
        if old is not None:
            await self._release(old, abort=True)
        self._forks[name] = entry
        try:
            host, port = await src.start(self.host, 0)
        except OSError as e:
            await self.rpc_fork_release(name, abort=True)
            raise RestoreError("serving the forked image", str(e)) from e
        entry.timer = asyncio.get_running_loop().call_later(
            FORK_SOURCE_TTL, lambda: self._spawn_task(self.rpc_fork_release(name, abort=True)))
        return {"template": name, "build_id": template.build_id, "source": f"{host}:{port}",
                "token": token, "image_bytes": template.image_bytes,
                "source_name": self.tls.name if self.tls is not None else None,
                "page_server": f"{page_server[0]}:{page_server[1]}" if page_server else None,
                "forked_from": {"id": inst.id, "template": inst.template, "node": self.runtime.name}}

    async def rpc_fork_release(self, template: str, abort: bool = False) -> dict:
        """The target has the image (or gave up: abort): stop serving it and clean up. A lazy
        source is cleaned once its page server has served every page (abort: at once, and the
        copy resumes)."""
        entry = self._forks.pop(template, None)
        if entry is None:
            return {"released": False}
        await self._release(entry, abort)
        return {"released": True}

    async def _release(self, entry: _ForkSource, abort: bool) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
        await entry.source.close()
        if entry.lazy is None:
            with contextlib.suppress(PoolError, OSError):
                self.store.remove(entry.name)  # the fork lives on its target now
            return

        def finish() -> None:
            try:
                if abort:
                    entry.lazy.abort()
                else:
                    entry.lazy.wait(LAZY_PAGES_TIMEOUT)
            except Exception as e:  # noqa: BLE001  logged: nobody waits for this
                log.warning("lazy fork %s: %s", entry.name, getattr(e, "message", e))
            finally:
                shutil.rmtree(entry.build_dir, ignore_errors=True)

        if abort:
            await self.runtime.run_blocking(finish)
        else:  # the pages flow while the target runs: do not hold the reply for it
            self._spawn_task(asyncio.to_thread(finish))

    def _spawn_task(self, coro) -> None:
        self.runtime.background(coro)

    # -- fork, target side --------------------------------------------------------------------------
    async def rpc_fork_restore(self, template: str, source: str, build_id: str, token: str,
                               page_server: str | None = None, hostname: str | None = None,
                               timeout: float = 60.0, source_name: str | None = None) -> dict:
        """Fetch a forked build and restore one copy of it with a fresh instance id."""
        fetched = await self.rpc_fetch_template(template, source, build_id, token, timeout,
                                                source_name)
        if page_server is None:
            r = await self.runtime.api.rpc_spawn(template, {}, [], timeout, hostname=hostname)
        else:
            r = await self._restore_lazy(template, parse_address(page_server, "page_server"), hostname, timeout)
        r["fetched"] = fetched
        return r

    async def _restore_lazy(self, name: str, page_server: tuple[str, int],
                            hostname: str | None, timeout: float, iid: str | None = None) -> dict:
        rt = self.runtime
        t0 = time.perf_counter()
        template = self.store.get(name)
        iid = iid or new_instance_id()
        rt.instances_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        run_dir = rt.instances_dir / f"{iid}.lazy-{secrets.token_hex(4)}"  # unique: it may come back

        def restore():
            with self.store.readable(template) as plain:  # encrypted store: its RAM plaintext
                inst, daemon = fork.restore_lazy(plain, self.criu, run_dir, page_server,
                                                 instance_id=iid, timeout=timeout)
            name_or_end(inst, hostname, daemon.kill)
            return inst, daemon

        inst, daemon = await rt.run_blocking(restore)
        inst.hostname, inst.state = hostname, "running"
        await rt.adopt_handed(inst, name, "lazy", on_end=daemon.kill)

        def pages_in() -> None:  # then the build is no longer needed (and must not be restored)
            try:
                daemon.wait(LAZY_PAGES_TIMEOUT)
            except Exception as e:  # noqa: BLE001
                log.warning("lazy copy %s: %s", iid, getattr(e, "message", e))
            with contextlib.suppress(PoolError, OSError):
                self.store.remove(name)

        self._spawn_task(asyncio.to_thread(pages_in))
        return {"id": iid, "template": name, "pid": inst.pid, "address": inst.address,
                "path": "lazy", "node": rt.name,
                "spawn_ms": round((time.perf_counter() - t0) * 1000, 3)}


def name_or_end(inst, hostname: str | None, *also: Callable[[], Any]) -> None:
    """Give a just restored copy its hostname; if that fails, end it (and what serves it, also)."""
    if not hostname:
        return
    try:
        netns.set_hostname(f"/proc/{inst.pid}/ns/uts", hostname)
    except OSError as e:
        inst.kill(grace=0)
        inst.close()
        for end in also:
            end()
        raise RestoreError("setting the hostname", str(e)) from e


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
