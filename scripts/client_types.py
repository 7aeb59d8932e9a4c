#!/usr/bin/env python3
"""Write the static types of the client methods into pool/client.py, from its method table.

    .venv/bin/python scripts/client_types.py          # rewrite the generated blocks
    .venv/bin/python scripts/client_types.py --check  # exit 1 if a block is out of date (a unit test runs this)

Client, AsyncClient, Instance and AsyncInstance get their methods at import time from METHODS (one
declaration per RPC method), which a type checker cannot see. So each class carries an
`if TYPE_CHECKING:` block of typed signatures, between `# generated: NAME` and `# end: NAME` markers,
written here from the same declarations: their parameters, and the result type each names with
`@returns(...)`. Instance methods return either the whole reply or one field of it (INSTANCE_METHODS);
a field's type is read from the reply's TypedDict in pool/wire/replies.py.
"""
from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import get_type_hints

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pool import client  # noqa: E402 - after the path is set
from pool.wire import replies  # noqa: E402

TARGET = ROOT / "pool" / "client.py"
INDENT = " " * 8
LINE = 110


def _params(declare, drop: str | None = None) -> list[str]:
    out = []
    for p in inspect.signature(declare).parameters.values():
        if p.name == drop:
            continue
        text = f"{p.name}: {p.annotation}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {json.dumps(p.default) if isinstance(p.default, str) else repr(p.default)}"
        out.append(text)
    return out


def _def(name: str, params: list[str], result: str, is_async: bool, comment: str = "") -> str:
    """One typed signature; comment goes on its first line (where a type checker reports)."""
    # In the class body a method named `list` shadows the builtin, so results say typing.List.
    result = re.sub(r"\blist\[", "List[", result)
    head = f"{INDENT}{'async ' if is_async else ''}def {name}("
    tail = f") -> {result}: ..."
    one_line = head + ", ".join(["self", *params]) + tail + comment
    if len(one_line) <= LINE:
        return one_line
    lines, current, width = [], head + "self", LINE - len(comment)
    for i, p in enumerate(params):  # wrapped like the rest of the code, aligned after the "("
        last = i == len(params) - 1
        if len(current) + 2 + len(p) + (len(tail) if last else 1) > width:
            lines.append(current + "," + (comment if not lines else ""))
            current, width = " " * len(head) + p, LINE
        else:
            current += ", " + p
    return "\n".join([*lines, current + tail + (comment if not lines else "")])


def _field_type(reply_type: str, field: str) -> str:
    hint = get_type_hints(getattr(replies, reply_type))[field]  # NotRequired[...] stripped
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def client_block(is_async: bool) -> list[str]:
    out = []
    for name, declare in client.METHODS.items():
        result = declare.returns
        if is_async and result == "Instance":
            result = "AsyncInstance"
        out.append(_def(name, _params(declare), result, is_async))
    return out


def instance_block(is_async: bool) -> list[str]:
    out = []
    for name, field in client.INSTANCE_METHODS.items():
        declare = client.METHODS[name]
        result = declare.returns if field is None else _field_type(declare.returns, field)
        # AsyncInstance's coroutines stand in for Instance's plain methods on purpose
        out.append(_def(name, _params(declare, drop="id"), result, is_async,
                        "  # type: ignore[override]" if is_async else ""))
    return out


BLOCKS = {
    "Client methods": lambda: client_block(False),
    "AsyncClient methods": lambda: client_block(True),
    "Instance methods": lambda: instance_block(False),
    "AsyncInstance methods": lambda: instance_block(True),
}


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(    # generated: {name}.*?\n).*?(    # end: {name}\n)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{TARGET}: no '# generated: {name}' ... '# end: {name}' block")
        body = "    if TYPE_CHECKING:\n" + "\n".join(make()) + "\n"
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    text = TARGET.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{TARGET.relative_to(ROOT)}: the typed method blocks are out of date; "
                  "run .venv/bin/python scripts/client_types.py")
            return 1
        return 0
    if new != text:
        TARGET.write_text(new)
        print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
