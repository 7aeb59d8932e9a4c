"""Typed reads of TOML tables, every problem a SpecError naming the file and the dotted field.

Shared by template specs (pool/templates/spec.py) and the service's config (pool/cluster/config.py).
"""
from __future__ import annotations

import difflib
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Callable, NoReturn

from pool.errors import SpecError

REQUIRED: Any = object()


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise SpecError(str(path), None, "file not found") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(str(path), None, f"not valid TOML: {e}") from e
    except OSError as e:
        raise SpecError(str(path), None, f"cannot read: {e.strerror}") from e


def _type_name(v: object) -> str:
    names = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "table"}
    if isinstance(v, list) and v:
        odd = next((x for x in v if not isinstance(x, str)), None)
        if odd is not None:
            return f"a list containing {_type_name(odd)}"
    return names.get(type(v), type(v).__name__)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int in Python, not in TOML


# kind -> (what was expected, test, conversion)
KINDS: dict[str, tuple[str, Callable[[Any], bool], Callable[[Any], Any]]] = {
    "str": ("a string", lambda v: isinstance(v, str), str),
    "int": ("an integer", _is_int, int),
    "float": ("a number", lambda v: _is_int(v) or isinstance(v, float), float),
    "bool": ("true or false", lambda v: isinstance(v, bool), bool),
    "strs": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), tuple),
    "table": ("a table", lambda v: isinstance(v, dict), dict),
}

Check = Callable[[Any], "str | None"]  # returns a problem, or None when the value is fine


class Table:
    """One TOML table being read; knows its dotted name so every error points at the field."""

    def __init__(self, path: Path, data: dict, prefix: str, keys: tuple[str, ...] | None) -> None:
        self.path, self.data, self.prefix = path, data, prefix
        for key in data if keys is not None else ():
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(keys)
                self.fail(key, f"unknown key {key!r}; {hint}")

    def name_of(self, key: str | None) -> str | None:
        if key is None:
            return self.prefix or None
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str | None, problem: str) -> NoReturn:
        raise SpecError(str(self.path), self.name_of(key), problem)

    def get(self, key: str, kind: str, default: Any = REQUIRED, check: Check | None = None) -> Any:
        expected, test, convert = KINDS[kind]
        if key not in self.data:
            if default is REQUIRED:
                self.fail(key, f"required, expected {expected}")
            return default
        value = self.data[key]
        if not test(value):
            self.fail(key, f"expected {expected}, got {_type_name(value)}")
        value = convert(value)
        if check is not None and (problem := check(value)):
            self.fail(key, problem)
        return value

    def size(self, key: str, default: int | None = None) -> int | None:
        """A size in bytes: an integer, or a string such as "512M" (see parse_size)."""
        value = self.data.get(key)
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ValueError as e:
                self.fail(key, str(e))
        return self.get(key, "int", default)

    def table(self, key: str, keys: tuple[str, ...] | None) -> Table | None:
        data = self.get(key, "table", None)
        return None if data is None else Table(self.path, data, f"{self.prefix}.{key}".lstrip("."), keys)


# --- value checks ---------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of "512M", "16G", "65536" (K, M, G, T are powers of 1024; "GiB", "GB" read the same).
    Raises ValueError."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size: a number of bytes, or with K, M, G or T "
                         "(powers of 1024), e.g. \"512M\"")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else f"must be greater than 0, got {v}"


def at_least(n: int) -> Check:
    return lambda v: None if v >= n else f"must be at least {n}, got {v}"


def port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else f"must be a port number 1..65535, got {v}"


def one_of(choices: tuple[str, ...]) -> Check:
    return lambda v: None if v in choices else f"expected one of {', '.join(map(repr, choices))}, got {v!r}"


