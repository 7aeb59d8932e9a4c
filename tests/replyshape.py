"""Check a real reply against its TypedDict in pool/wire/replies.py: every required key there, no key
the type does not declare, each value of the declared type (nested TypedDicts, lists and dicts
followed). A reply that drifts from its declared shape fails the test that received it."""
from __future__ import annotations

import types
import typing
from typing import Any, get_args, get_origin, get_type_hints, is_typeddict


def shape_errors(value: Any, tp: Any, where: str = "reply") -> list[str]:
    if tp is Any:
        return []
    if is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{where}: expected a map ({tp.__name__}), got {type(value).__name__}"]
        keys = set(value)
        errors = [f"{where}: missing key {k!r} of {tp.__name__}"
                  for k in sorted(tp.__required_keys__ - keys)]
        errors += [f"{where}: key {k!r} is not declared in {tp.__name__}"
                   for k in sorted(keys - tp.__required_keys__ - tp.__optional_keys__)]
        hints = get_type_hints(tp)
        for k in sorted(keys & set(hints)):
            errors += shape_errors(value[k], hints[k], f"{where}[{k!r}]")
        return errors
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        alternatives = [shape_errors(value, a, where) for a in args]
        return [] if any(not e for e in alternatives) else min(alternatives, key=len)
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [e for i, v in enumerate(value) for e in shape_errors(v, args[0], f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: expected a map, got {type(value).__name__}"]
        return [e for k, v in value.items() for e in
                shape_errors(k, args[0], f"{where} key") + shape_errors(v, args[1], f"{where}[{k!r}]")]
    if tp is type(None):
        return [] if value is None else [f"{where}: expected None, got {value!r}"]
    accepted = (int, float) if tp is float else tp   # msgpack sends 3.0 as it was made: maybe an int
    if isinstance(value, bool) and tp is not bool:
        return [f"{where}: expected {tp.__name__}, got bool"]
    return [] if isinstance(value, accepted) else \
        [f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r:.60}"]


def assert_shape(value: Any, tp: Any) -> Any:
    """value, after checking it is of type tp (a TypedDict, or list[...] of one)."""
    errors = shape_errors(value, tp)
    assert not errors, "reply does not match its declared type:\n  " + "\n  ".join(errors)
    return value
