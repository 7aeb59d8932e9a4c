#!/usr/bin/env python3
"""Write the generated parts of docs/architecture.md and README.md from the code itself.

    python3 scripts/architecture.py          # rewrite the generated blocks
    python3 scripts/architecture.py --check  # exit 1 if a block is out of date (a unit test runs this)

What it generates, between `<!-- generated: NAME -->` and `<!-- end: NAME -->` markers:
- `layers`: a picture (Mermaid) of the packages, in the order of the import-linter layers contract in
  pyproject.toml, with an arrow for every package that imports another;
- `modules`: every module of pool/, by package, with the first line of its docstring;
- `overview`: the layers as a short text picture (the README's);
- `errors`: the error taxonomy table, from pool/errors.py's docstring.
Only the standard library is used, so it runs before `make setup`.
"""
from __future__ import annotations

import ast
import re
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pool"
TARGETS = (ROOT / "docs" / "architecture.md", ROOT / "README.md")


def layers() -> list[list[str]]:
    """The layers contract, top first: each layer a list of module names (siblings share a layer)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    spec = next(c for c in contracts if c["type"] == "layers")["layers"]
    return [[m.strip() for m in re.split(r"[|:]", layer)] for layer in spec]


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (no __main__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return re.split(r"(?<=\.)\s", first, maxsplit=1)[0]


def imports(path: Path, name: str) -> set[str]:
    """Modules of the package that `name` imports (at any depth of the file)."""
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pool"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("pool"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def owner(module: str, units: list[str]) -> str | None:
    """The layer unit (package or base module) a module belongs to."""
    best = None
    for u in units:
        if (module == u or module.startswith(u + ".")) and (best is None or len(u) > len(best)):
            best = u
    return best


def layers_block() -> str:
    stack = layers()
    units = [u for layer in stack for u in layer]
    mods = modules()
    edges = set()
    for name, path in mods.items():
        src = owner(name, units)
        for target in imports(path, name):
            dst = owner(target, units)
            # the base layer is used by every layer: its arrows would only hide the others
            if src and dst and src != dst and target in mods and dst not in stack[-1] + stack[-2]:
                edges.add((src, dst))
    node_id = {u: u.replace("pool.", "").replace(".", "_") for u in units}
    lines = ["```mermaid", "flowchart TB"]
    for i, layer in enumerate(stack):
        lines.append(f'  subgraph L{i}[" "]')
        lines.extend(f'    {node_id[u]}["{u}"]' for u in layer)
        lines.append("  end")
    for src, dst in sorted(edges):
        lines.append(f"  {node_id[src]} --> {node_id[dst]}")
    lines.append("```")
    lines.append("")
    lines.append("(Every layer also uses the base modules of the two bottom layers.)")
    lines.append("")
    lines.append("Layers, top first (a layer imports only from layers below it; `make test` checks it):")
    lines.append("")
    lines.extend(f"{i + 1}. " + ", ".join(f"`{u}`" for u in layer) for i, layer in enumerate(stack))
    lines.append("")
    lines.append("Outside the layers: `pool.runtime` (the in-app SDK) imports only `pool.wire.control`, "
                 "and `pool.client` nothing of the service; `pool/__init__.py` re-exports the client API.")
    return "\n".join(lines)


def overview_block() -> str:
    """The layers as a short text picture: one line per layer unit, top first, with what it is."""
    mods = modules()
    rows = []
    for i, layer in enumerate(layers()):
        for unit in layer:
            rows.append((str(i + 1) if unit == layer[0] else "", unit, summary(mods[unit])))
    width = max(len(u) for _, u, _ in rows)
    lines = ["    layer  package" + " " * (width - 7) + "  what it is (imports only from the layers below)"]
    indent = " " * (4 + 5 + 2 + width + 2)
    for n, u, s in rows:
        lines.append(textwrap.fill(s, 104, initial_indent=f"    {n:>5}  {u:<{width}}  ",
                                   subsequent_indent=indent))
    return "\n".join(lines)


def modules_block() -> str:
    mods = modules()
    out = []
    for group in ["pool"] + sorted({n.rsplit(".", 1)[0] for n in mods if n.count(".") >= 2}):
        names = [n for n in mods if n.rsplit(".", 1)[0] == group or (group != "pool" and n == group)]
        if group == "pool":
            names = [n for n in mods if n == "pool" or (n.count(".") == 1
                                                        and not (PACKAGE / n.split(".")[1]).is_dir())]
        out.append(f"### `{group}/`" if group != "pool" else "### `pool/` (base, SDK, client)")
        out.append("")
        out.append("| module | what it is |")
        out.append("|---|---|")
        for n in sorted(names):
            rel = mods[n].relative_to(ROOT)
            out.append(f"| [`{n}`](../{rel}) | {summary(mods[n]).replace('|', '/')} |")
        out.append("")
    return "\n".join(out).rstrip()


def errors_block() -> str:
    """The taxonomy table of pool/errors.py's docstring (its one source)."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "errors.py").read_text())) or ""
    return "\n".join(line for line in doc.splitlines() if line.startswith("|"))


def render(text: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", re.S)
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    blocks = {"layers": layers_block(), "modules": modules_block(), "overview": overview_block(),
              "errors": errors_block()}
    stale = []
    for target in TARGETS:
        old = target.read_text()
        new = render(old, blocks)
        if new != old:
            stale.append(target)
            if "--check" not in argv:
                target.write_text(new)
    if "--check" in argv and stale:
        print("out of date (run python3 scripts/architecture.py): " + ", ".join(str(p.relative_to(ROOT))
                                                                          for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
