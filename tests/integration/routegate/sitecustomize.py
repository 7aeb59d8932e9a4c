"""Test-only: loaded by a `pool serve` that test_etcd.py starts with this directory on PYTHONPATH
and POOL_TEST_ROUTE_GATE naming a directory. It holds one spawn at a known point: the copy is
restored and running on its agent, and the coordinator is about to record its route in etcd
(EtcdRegistry.set_route). So the test can stop etcd while that spawn is in flight, no timing luck.

The gate is armed by a file `armed` in the directory. The first set_route that finds it removes it
(later spawns pass), writes the instance id to `reached`, and waits, the event loop free, until
`release` exists; then the real set_route runs."""
import asyncio
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

_DIR = os.environ.get("POOL_TEST_ROUTE_GATE")
_MODULE = "pool.cluster.registry"
_HOLD_S = 120.0          # never hold forever: a test that died must not wedge the service


def _patch(module) -> None:
    gate = Path(_DIR)
    real = module.EtcdRegistry.set_route

    async def gated_set_route(self, iid: str, node: str) -> None:
        armed = gate / "armed"
        if armed.exists():
            armed.unlink()
            tmp = gate / "reached.tmp"
            tmp.write_text(iid)
            tmp.rename(gate / "reached")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _HOLD_S
            while not (gate / "release").exists() and loop.time() < deadline:
                await asyncio.sleep(0.01)
        await real(self, iid, node)

    module.EtcdRegistry.set_route = gated_set_route


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the registry module right after it is executed (importing it here would import
    whichever `pool` site-packages has, not the one the service runs from)."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_then_patch(module) -> None:
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


if _DIR:
    sys.meta_path.insert(0, _PatchOnImport())
