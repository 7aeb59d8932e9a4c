"""Can a template image be restored on a node? A pure check over the image's manifest and the node's
facts, so a sender can refuse to ship an image before a single byte moves, and a scheduler can skip
nodes without asking them. The CPU-feature check needs the image's cpuinfo.img and CRIU on the node,
so it stays a restore-time step (Restorer.check_compatible).
"""
from __future__ import annotations

import platform
import re
from dataclasses import asdict, dataclass
from typing import Any

from pool.errors import Incompatible
from pool.templates.manifest import Manifest


@dataclass(frozen=True)
class NodeFacts:
    arch: str            # platform.machine(), e.g. x86_64
    kernel: str          # platform.release(), e.g. 6.18.44-fc
    criu_version: str    # e.g. 4.2.1

    def to_wire(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_wire(cls, raw: Any) -> "NodeFacts":
        """From a peer's message; ValueError names the first bad field."""
        if not isinstance(raw, dict):
            raise ValueError(f"node facts must be a map, not {type(raw).__name__}")
        values = {}
        for name in ("arch", "kernel", "criu_version"):
            v = raw.get(name)
            if not isinstance(v, str) or not v or len(v) > 200:
                raise ValueError(f"node facts: {name} must be a non-empty string")
            values[name] = v
        return cls(**values)


def node_facts(criu: Any) -> NodeFacts:
    """This node's facts; `criu` is a pool.cr.criu.Criu (its version is asked once and cached)."""
    return NodeFacts(arch=platform.machine(), kernel=platform.release(),
                     criu_version=str(criu.version()))


def version_tuple(text: str) -> tuple[int, ...]:
    """Major and minor of a version string ("6.18.44-fc" -> (6, 18)); () if it has no digits."""
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def compatibility_problem(manifest: Manifest, facts: NodeFacts) -> str | None:
    """Why an image with this manifest cannot be restored on a node with these facts, or None.

    Same architecture; CRIU and kernel at least as new (major.minor) as where it was dumped: CRIU
    reads older images, and an older kernel may lack what the dump recorded.
    """
    if manifest.arch != facts.arch:
        return f"image is for {manifest.arch}, the node is {facts.arch}"
    need_criu = manifest.criu_version
    if not version_tuple(need_criu):
        return "the image's manifest does not say which CRIU dumped it"
    if version_tuple(facts.criu_version) < version_tuple(need_criu):
        return f"image was dumped by CRIU {need_criu}, the node has CRIU {facts.criu_version}"
    need_kernel = manifest.kernel
    if version_tuple(facts.kernel) < version_tuple(need_kernel):
        return (f"image was dumped on kernel {need_kernel}, the node runs the older "
                f"{facts.kernel}")
    return None


def check(manifest: Manifest, facts: NodeFacts) -> None:
    """compatibility_problem as an Incompatible error."""
    problem = compatibility_problem(manifest, facts)
    if problem is not None:
        raise Incompatible(problem, template=manifest.name, build_id=manifest.build_id)
