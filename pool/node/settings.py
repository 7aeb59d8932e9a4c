"""What a node runtime is configured with. The coordinator's ServiceConfig produces it
(ServiceConfig.node_settings); the node knows nothing of the coordinator's own settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pool import config
from pool.cr.cgroups import Limits
from pool.node.live import LiveSettings
from pool.node.warm import WarmSettings
from pool.templates.imagecrypt import ImageKey
from pool.templates.store import Store


@dataclass(frozen=True)
class NodeSettings:
    store: Path = field(default_factory=config.store_path)
    run_dir: Path = field(default_factory=config.run_dir)
    capacity: int = 64                   # copies this node holds in all templates together
    kill_grace: float = 3.0              # SIGTERM, then SIGKILL this much later
    drain_timeout: float = 10.0          # seconds in-flight spawns get on shutdown
    on_shutdown: str = "kill"            # "kill" | "leave" live copies
    restore_concurrency: int = 4         # CRIU restores at once (threads)
    quarantine_after: int = 3            # a template's bad outcomes in a row
    early_death_s: float = 2.0           # a copy exiting sooner after its spawn is a bad outcome
    exited_history: int = 1000           # exited copies kept for info/logs
    max_log_bytes: int = 8 << 20         # per stream of a copy; beyond it the oldest bytes are cut
    restore_timeout: float = 60.0        # one CRIU restore; CRIU is killed after it
    memory_budget: int | None = None     # bytes for the warm copies of all templates (demand.py)
    defaults: WarmSettings = WarmSettings()
    templates: dict[str, WarmSettings] = field(default_factory=dict)
    copy_limits: Limits = Limits()       # each copy's cgroup limits where its template sets none
    encrypt_images: bool = False         # the store's image files sealed with image_key
    image_key: Path = config.DEFAULT_IMAGE_KEY

    def open_store(self) -> Store:
        """The node's store; with encrypt_images, its images sealed at rest with image_key (made
        if missing)."""
        key = ImageKey.load_or_create(self.image_key, self.store) if self.encrypt_images else None
        return Store(self.store, key=key)
    live: dict[str, LiveSettings] = field(default_factory=dict)   # running instances, per template

    def warm_settings(self, template: str) -> WarmSettings:
        return self.templates.get(template, self.defaults)

    def live_settings(self, template: str) -> LiveSettings:
        return self.live.get(template) or LiveSettings()
