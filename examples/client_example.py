"""Spawn copies of py-hello through a running `pool serve`, three ways.

    pool build py-hello && pool serve --config examples/service.toml &
    POOL_SOCKET=/run/pool/pool.sock python examples/client_example.py
"""
import asyncio
import json
import urllib.request

import pool


def get(inst) -> dict:
    with urllib.request.urlopen(inst.url, timeout=10) as r:
        return json.load(r)


def module_level() -> None:
    inst = pool.spawn("py-hello", env={"GREETING": "hi"}, args=["--one"])
    print(f"{inst.id} via {inst.served_by} in {inst.spawn_ms:.2f} ms at {inst.address}: {get(inst)}")
    inst.kill()


def sync_client() -> None:
    with pool.Client() as c:
        try:
            inst = c.spawn("py-hello", timeout=5)
        except pool.NoCapacity:
            print("all copies busy")
            return
        print(c.info(inst.id)["stats"])
        inst.kill(grace=1)
        print("exit status", inst.wait(), "output:", inst.logs().decode())


async def async_client() -> None:
    async with await pool.AsyncClient.connect() as c:
        insts = await asyncio.gather(*(c.spawn("py-hello") for _ in range(4)))
        print([(i.id, i.served_by) for i in insts])
        await asyncio.gather(*(i.kill() for i in insts))


if __name__ == "__main__":
    module_level()
    sync_client()
    asyncio.run(async_client())
