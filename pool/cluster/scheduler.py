"""Choose the node for a spawn: a pure function of what the service knows about its nodes.

Order of preference: the node the caller named (an error if it cannot take the spawn, never a quiet
fallback elsewhere), else healthy compatible nodes with free capacity, those that hold the template
first (no transfer before the restore), then the most free capacity, then the name (deterministic).
When no node fits, the error lists why each node was skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pool.errors import Incompatible, NoCapacity, NodeUnavailable


@dataclass(frozen=True)
class NodeView:
    name: str
    healthy: bool
    templates: frozenset[str] = frozenset()   # templates cached on the node
    free: int = 0                              # copies it can still take
    compatible: bool | str = True              # True, or why the template cannot run there

    def problem(self, template: str) -> str | None:
        """Why this node cannot take a spawn of template now, or None."""
        if not self.healthy:
            return "unhealthy"
        if self.compatible is not True:
            why = self.compatible if isinstance(self.compatible, str) and self.compatible else ""
            return f"incompatible: {why}" if why else "incompatible"
        if self.free <= 0:
            return "no free capacity"
        return None


@dataclass(frozen=True)
class Choice:
    node: str
    cached: bool                         # the node holds the template: no transfer needed
    skipped: dict[str, str] = field(default_factory=dict)  # node -> why it was not chosen


def choose_node(nodes: list[NodeView], template: str, *, prefer: str | None = None) -> Choice:
    """The node to spawn `template` on. Raises NodeUnavailable, NoCapacity or Incompatible."""
    by_name = {n.name: n for n in nodes}
    if len(by_name) != len(nodes):
        raise ValueError("node names must be unique")
    if prefer is not None:
        node = by_name.get(prefer)
        if node is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise NodeUnavailable(f"no node named {prefer!r} (known: {known})", node=prefer)
        why = node.problem(template)
        if why is not None:
            raise _error(why, f"node {prefer!r} cannot take a spawn of {template!r}: {why}",
                         node=prefer, template=template)
        return Choice(node.name, template in node.templates)

    skipped: dict[str, str] = {}
    fit: list[NodeView] = []
    for n in nodes:
        why = n.problem(template)
        if why is None:
            fit.append(n)
        else:
            skipped[n.name] = why
    if not fit:
        if not nodes:
            raise NodeUnavailable(f"no nodes to spawn {template!r} on", template=template)
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(skipped.items()))
        msg = f"no node can take a spawn of {template!r} ({reasons})"
        whys = list(skipped.values())
        if any(w == "no free capacity" for w in whys):
            raise NoCapacity(msg, template=template, skipped=skipped)
        if all(w.startswith("incompatible") for w in whys):
            raise Incompatible(msg, template=template, skipped=skipped)
        raise NodeUnavailable(msg, template=template, skipped=skipped)
    best = min(fit, key=lambda n: (template not in n.templates, -n.free, n.name))
    for n in fit:
        if n is best:
            continue
        if (template in n.templates) != (template in best.templates):
            skipped[n.name] = "does not hold the template"
        else:
            skipped[n.name] = "fewer free slots" if n.free < best.free else "tie, broken by name"
    return Choice(best.name, template in best.templates, skipped)


def _error(why: str, msg: str, **data):
    if why == "no free capacity":
        return NoCapacity(msg, **data)
    if why.startswith("incompatible"):
        return Incompatible(msg, **data)
    return NodeUnavailable(msg, **data)
