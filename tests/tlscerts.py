"""A throwaway cluster CA and node certificates for tests (pool/wire/tls.py), in a directory the
caller owns (a tmp dir, removed with it).

    certs = Cluster(tmp_path / "certs")
    certs.node("n2")          # TlsFiles for n2 (issued on first use)
    certs.dir("n2")           # its TLS directory, for `--tls-dir`
"""
from __future__ import annotations

from pathlib import Path

from pool.wire import tls


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        tls.make_ca(self.root)

    def dir(self, node: str) -> Path:
        d = self.root / node
        if not (d / tls.NODE_CERT).exists():
            tls.issue(self.root, node)
        return d

    def node(self, node: str) -> tls.TlsFiles:
        return tls.TlsFiles.load(self.dir(node))

    def impostor(self, other: "Cluster", node: str) -> Path:
        """A TLS dir that trusts this cluster's CA but holds a certificate from other's CA: a
        rogue that passes its own checks of the peer and presents a certificate we never signed."""
        d = self.root / f"impostor-{node}"
        d.mkdir(mode=0o700, exist_ok=True)
        theirs = other.dir(node)
        (d / tls.CA_CERT).write_bytes((self.root / tls.CA_CERT).read_bytes())
        (d / tls.NODE_CERT).write_bytes((theirs / tls.NODE_CERT).read_bytes())
        (d / tls.NODE_KEY).write_bytes((theirs / tls.NODE_KEY).read_bytes())
        (d / tls.NODE_KEY).chmod(0o600)
        return d
