"""Paths, defaults and limits. Environment variables override defaults; nothing here has side effects."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CRIU_PREFIX = Path("/opt/prewarm-pool/criu")
DEFAULT_STORE = Path("/var/lib/pool/templates")
DEFAULT_RUN_DIR = Path("/run/pool")
DEFAULT_SOCKET = DEFAULT_RUN_DIR / "pool.sock"
DEFAULT_IMAGE_KEY = Path("/etc/pool/image.key")
MIN_CRIU_VERSION = (4, 2)


def criu_candidates() -> list[tuple[str, str]]:
    """Where to look for CRIU, in order, each with the reason it is a candidate."""
    out: list[tuple[str, str]] = []
    env = os.environ.get("POOL_CRIU")
    if env:
        return [(env, "POOL_CRIU")]
    out.append((str(DEFAULT_CRIU_PREFIX / "bin" / "criu"), "installer default"))
    system = shutil.which("criu")
    if system:
        out.append((system, "PATH"))
    return out


def store_path() -> Path:
    return Path(os.environ.get("POOL_STORE", DEFAULT_STORE))


def image_key_path() -> Path | None:
    """The image key node commands (build, restore, inspect) seal and read images with: the
    node's [service] image_key when it sets encrypt_images. None: a plain store."""
    env = os.environ.get("POOL_IMAGE_KEY")
    return Path(env) if env else None


def run_dir() -> Path:
    return Path(os.environ.get("POOL_RUN_DIR", DEFAULT_RUN_DIR))


def socket_path() -> Path:
    return Path(os.environ.get("POOL_SOCKET", run_dir() / "pool.sock"))


@dataclass(frozen=True)
class Limits:
    criu_timeout: float = 120.0       # seconds for one dump or restore before CRIU is killed
    identity_timeout: float = 10.0    # seconds a restored copy has to ack its identity
    kill_grace: float = 3.0           # SIGTERM to SIGKILL
    max_frame: int = 4 * 1024 * 1024  # bytes of one RPC frame
    # What one caller may give a copy (spawn/fork), checked at the RPC boundary. The identity frame
    # must fit the SDK's 1 MiB control frame, and writing it must stay cheap for the service.
    max_identity_bytes: int = 256 * 1024  # env keys + values + args, UTF-8 bytes, all together
    max_env_vars: int = 1024
    max_args: int = 1024
    max_min_warm: int = 4096          # set_warm: anything larger is a typo, not a pool size
    max_duration: float = 7 * 86400.0  # seconds: timeouts and graces beyond a week are refused
