"""Mistakes a type checker must catch in code using the client API (tests/unit/test_client_types.py
expects an error on every line marked `# error`). Never run, only checked."""
from __future__ import annotations

import pool
from pool.client import AsyncClient, Client, Instance


def blocking(c: Client) -> None:
    c.stats()["tempaltes"]  # error: a key the reply does not have
    c.spawn("py-hello", envs={"A": "1"})  # error: a parameter spawn does not take
    c.kill(42)  # error: an instance id is a str
    port: str = c.info("x")["port"]  # error: port is int | None
    c.spawn("py-hello").wait(timeout=1.0) + 1  # error: wait gives int | None
    pool.spawn("py-hello").adress  # error: an attribute Instance does not have


async def concurrent(c: AsyncClient) -> None:
    inst: Instance = c.spawn("py-hello")  # error: a coroutine, not awaited
    (await c.list())[0]["stat"]  # error: a key the reply does not have
    print(inst)
