"""Manifest: what a template build is (manifest.json beside its image), as one typed, checked value.

The JSON on disk is the exchange format between nodes and store versions, so it is kept exactly:
to_dict() writes the keys from_dict() read, optional ones only when the build has them, and keys
this version does not know (a newer node's) are carried through unchanged.

from_dict() is the boundary: a manifest read from disk or sent by a peer becomes a Manifest, or
TemplateCorrupt naming the field. Its names become paths (build id, image file names), so they are
held to what a directory entry may be: NAME, or parent/NAME for a file of the pre-dump image that
an iterative dump's pages refer to (CRIU reads it through image/parent; pool/copies/snapshots.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from pool.errors import TemplateCorrupt

MANIFEST = "manifest.json"
FORMAT = 1
_BUILD_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")   # a directory name, never a path
PARENT = "parent"   # CRIU's link from an iterative dump's image dir to its pre-dump's (CR_PARENT_LINK)
_FILE_RE = re.compile(r"^(?:parent/)?[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")  # NAME or parent/NAME
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def valid_build_id(build_id: Any) -> bool:
    return isinstance(build_id, str) and bool(_BUILD_ID_RE.match(build_id))


@dataclass(frozen=True)
class ImageFile:
    """One file of the image, as the build sealed it."""

    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    name: str
    build_id: str
    spec: Mapping[str, Any]            # the template spec as built (Spec.to_dict())
    criu_version: str                  # of the CRIU that dumped it
    kernel: str                        # where it was dumped
    arch: str
    pipes: Mapping[str, int]           # stdout, stderr [, ctl_in, ctl_out] -> the builder's pipe inodes
    files: Mapping[str, ImageFile]
    image_bytes: int
    spec_digest: str | None = None     # None for a fork of a build that had none
    format: int = FORMAT
    built_at: str | None = None
    dump_s: float | None = None
    # a build's own figures; a fork has none
    rss_bytes: int | None = None
    boot_to_ready_s: float | None = None
    warmup_s: float | None = None
    build_s: float | None = None
    # a fork of a running copy (pool/copies/fork.py)
    stdio_keys: Mapping[str, str] | None = None   # stdout/stderr -> CRIU inherit-fd key of its file
    forked_from: Mapping[str, Any] | None = None
    lazy_pages: bool | None = None                # its memory is served by a page server
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know

    # -- what restores ask ---------------------------------------------------------------------------
    @property
    def sdk(self) -> bool:
        """The app speaks the control channel: each copy is handed its identity."""
        return "ctl_in" in self.pipes

    @property
    def port(self) -> int | None:
        """The app's port inside its namespace, if the spec names one."""
        return _section(self.spec, "network").get("port")

    @property
    def tcp_close(self) -> bool:
        """Dumped with tcp_close: it only restores with it too ("Need to set the --tcp-close")."""
        return bool(_section(self.spec, "checkpoint").get("tcp_close"))

    @property
    def restore_spec(self) -> Mapping[str, Any]:
        """The spec's [restore] table (identity_timeout, hostname)."""
        return _section(self.spec, "restore")

    @property
    def restore_method(self) -> str:
        """How a node makes copies of this build: "criu", "fork" or "lazy" (spec [restore] method)."""
        return str(self.restore_spec.get("method", "criu"))

    @property
    def has_ghost_files(self) -> bool:
        """The app held a deleted file, recreated at its old path by each restore."""
        return any(f.startswith("ghost-file") for f in self.files)

    def stdio_key(self, stream: str) -> str:
        """CRIU's inherit-fd key for the copy's stream: a fork's log file, else the builder's pipe."""
        if self.stdio_keys and self.stdio_keys.get(stream):
            return self.stdio_keys[stream]
        return self.pipe_key(stream)

    def pipe_key(self, pipe: str) -> str:
        """CRIU's inherit-fd key for one of the builder's pipes (stdout, stderr, ctl_in, ctl_out)."""
        if pipe not in self.pipes:
            raise TemplateCorrupt(self.name, f"{MANIFEST}: pipes has no {pipe}")
        return f"pipe:[{self.pipes[pipe]}]"

    # -- the JSON form --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name not in _ALWAYS_WRITTEN):
                continue
            if f.name == "files":
                value = {rel: meta.to_dict() for rel, meta in value.items()}
            elif isinstance(value, Mapping):
                value = _plain(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, raw: Any, name: str | None = None) -> "Manifest":
        """Check raw (a parsed manifest.json) field by field; name, if given, is the name it must
        carry. TemplateCorrupt names the first bad field."""
        who = name if name is not None else (raw.get("name") if isinstance(raw, dict) else None)
        who = who if isinstance(who, str) else "?"

        def bad(what: str) -> TemplateCorrupt:
            return TemplateCorrupt(who, f"{MANIFEST}: {what}")

        if not isinstance(raw, dict):
            raise bad("the manifest is not a map")
        if raw.get("format") != FORMAT:
            raise bad(f"format is {raw.get('format')!r}, expected {FORMAT}")
        if not isinstance(raw.get("name"), str) or (name is not None and raw["name"] != name):
            raise bad(f"name is {raw.get('name')!r}, expected {name!r}")
        if not valid_build_id(raw.get("build_id")):
            raise bad(f"bad build id {raw.get('build_id')!r}")
        for key in ("criu_version", "kernel", "arch"):
            if not isinstance(raw.get(key), str):
                raise bad(f"{key} must be a string, not {type(raw.get(key)).__name__}")
        if not isinstance(raw.get("spec"), dict):
            raise bad("spec must be a map")
        for key in ("network", "checkpoint", "restore"):
            if not isinstance(raw["spec"].get(key) or {}, dict):
                raise bad(f"spec.{key} must be a map")
        pipes = raw.get("pipes")
        if not isinstance(pipes, dict) or not all(
                isinstance(k, str) and _is_int(v) for k, v in pipes.items()):
            raise bad("pipes must map stream names to pipe inodes")
        files = _files(raw.get("files"), bad)
        if not _is_int(raw.get("image_bytes")) or raw["image_bytes"] != sum(
                f.size for f in files.values()):
            raise bad("image_bytes is not the sum of the file sizes")
        for key in ("spec_digest", "built_at"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise bad(f"{key} must be a string")
        for key in ("dump_s", "boot_to_ready_s", "warmup_s", "build_s", "rss_bytes"):
            v = raw.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise bad(f"{key} must be a number")
        keys = raw.get("stdio_keys")
        if keys is not None and not (isinstance(keys, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in keys.items())):
            raise bad("stdio_keys must map stream names to strings")
        if raw.get("forked_from") is not None and not isinstance(raw["forked_from"], dict):
            raise bad("forked_from must be a map")
        if raw.get("lazy_pages") is not None and not isinstance(raw["lazy_pages"], bool):
            raise bad("lazy_pages must be true or false")

        known = {f.name for f in fields(cls)} - {"extra", "files"}
        values = {k: _plain(v) for k, v in raw.items() if k in known}
        return cls(**values, files=files,
                   extra={k: v for k, v in raw.items() if k not in known and k != "files"})


_ALWAYS_WRITTEN = frozenset({"spec_digest"})  # both builds and forks write it, null included


def _files(raw: Any, bad) -> dict[str, ImageFile]:
    if not isinstance(raw, dict) or not raw:
        raise bad("the manifest lists no image files")
    files = {}
    for rel, meta in raw.items():
        if not isinstance(rel, str) or not _FILE_RE.match(rel) or rel == PARENT:
            raise bad(f"bad image file name {rel!r}")
        if (not isinstance(meta, dict) or not _is_int(meta.get("size")) or meta["size"] < 0
                or not isinstance(meta.get("sha256"), str) or not _SHA_RE.match(meta["sha256"])):
            raise bad(f"files: bad size or sha256 for {rel}")
        files[rel] = ImageFile(size=meta["size"], sha256=meta["sha256"])
    return files


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _section(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    return spec.get(key) or {}


def _plain(value: Any) -> Any:
    """A fresh JSON-ready copy: callers of to_dict may change what they get."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
