"""Typed use of the client API as an application writes it: mypy must accept all of it
(tests/unit/test_client_types.py). Never run, only checked."""
from __future__ import annotations

import pool
from pool.client import AsyncClient, AsyncInstance, Client, Instance
from pool.wire.replies import CopyInfo, PoolFigures


def blocking(c: Client) -> None:
    inst: Instance = c.spawn("py-hello", env={"A": "1"}, args=["--x"], timeout=5.0)
    info: CopyInfo = c.info(inst.id)
    pid: int = info["pid"]
    rss: int = info["stats"]["rss_bytes"]
    status: int | None = inst.wait(timeout=1.0)
    data: bytes = inst.logs("stderr")
    ids: list[str] = [row["id"] for row in c.list("py-hello")]
    figures: PoolFigures = c.stats()["templates"]["py-hello"]
    warm: int = figures["warm"] + c.set_warm("py-hello", 2)["min_warm"]
    names: list[str] = [t["name"] for t in c.templates()] + [n["name"] for n in c.nodes()]
    forked: str = c.fork(inst.id)["forked_from"]["id"]
    with c.spawn("py-hello") as scoped:
        served: str = scoped.served_by
    print(pid, rss, status, data, ids, warm, names, forked, served, pool.spawn("py-hello").address)


async def concurrent(c: AsyncClient) -> None:
    inst: AsyncInstance = await c.spawn("py-hello", node="n1")
    info: CopyInfo = await inst.info()
    status: int | None = await inst.wait()
    rows: list[CopyInfo] = await c.list()
    async with await c.spawn("py-hello") as scoped:
        await scoped.kill(grace=0.5)
    print(info["end_cause"], status, rows, (await c.stats())["live"], (await c.ping())["pong"])


def through_the_package() -> None:
    inst: pool.Instance = pool.spawn("py-hello", timeout=2.0)
    try:
        inst.kill()
    except (pool.NoCapacity, pool.errors.InstanceNotFound) as e:
        code: str = e.code
        print(code)
