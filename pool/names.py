"""Names and addresses every layer checks the same way: template and node names, the store names of
forks, and HOST:PORT. Pure; each parse error is a ValueError that callers turn into their own typed
error (a SpecError naming the field in a file, a BadRequest naming the RPC parameter)."""
from __future__ import annotations

import re
import secrets

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
NAME_RULE = "lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, at most 63 chars"

# A fork of a live copy is stored as TEMPLATE+fork-RANDOM: '+' is in no template name, so a fork can
# never replace (or be released over) a template, and 64 random bits keep two forks apart.
FORK_SEP = "+fork-"
STORED_NAME_RE = re.compile(rf"{NAME_RE.pattern}(?:\+fork-[0-9a-f]{{16}})?")


def is_name(name: str) -> bool:
    """A template's or a node's name (NAME_RULE)."""
    return bool(NAME_RE.fullmatch(name))


def is_stored_name(name: str) -> bool:
    """A name the store accepts: a template's, or a fork's (fork_name)."""
    return bool(STORED_NAME_RE.fullmatch(name))


def fork_name(template: str) -> str:
    """A store name for a new fork of a copy of template: unique, and never a template's name."""
    return f"{template}{FORK_SEP}{secrets.token_hex(8)}"


def parse_hostport(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); ValueError says what is wrong."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT like 127.0.0.1:9464, got {text!r}")
    return host.strip("[]"), int(port)
