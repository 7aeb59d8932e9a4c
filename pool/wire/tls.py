"""Mutual TLS for every TCP link: the cluster's certificate files and the ssl contexts made from them.

A cluster has one CA (`pool certs init`); each node gets a key and a certificate it signed
(`pool certs issue NODE`), whose subject and DNS name are the node's name. A node's TLS directory
holds three files: ca.crt (the cluster CA), node.crt and node.key (its own). Both ends of a link
present their certificate and check the other's against the CA (TLS 1.3 only); a client also checks
that the server's certificate names the node it meant to reach (the `[nodes.NAME]` name). A server
accepts any certificate the cluster CA signed: the CA is the trust boundary.

    certs/ (0700)        ca.crt  ca.key (0600)
    certs/n2/ (0700)     ca.crt  node.crt  node.key (0600)      <- copy to n2, pass as --tls-dir
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pool.errors import SpecError, TlsError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
NODE_CERT, NODE_KEY = "node.crt", "node.key"
CA_DAYS = 3650
NODE_DAYS = 825


@dataclass(frozen=True)
class TlsFiles:
    """One node's TLS directory, checked: the CA to trust, its own certificate and key, its name."""

    dir: Path
    name: str                  # the node name its certificate carries

    @property
    def ca(self) -> Path:
        return self.dir / CA_CERT

    @property
    def cert(self) -> Path:
        return self.dir / NODE_CERT

    @property
    def key(self) -> Path:
        return self.dir / NODE_KEY

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TlsFiles:
        """SpecError naming the file if one is missing, unreadable, or the key is readable by others."""
        d = Path(directory)
        for f in (CA_CERT, NODE_CERT, NODE_KEY):
            if not (d / f).is_file():
                raise SpecError(str(d / f), None, "missing: make it with `pool certs issue NODE` "
                                "and copy that node's directory here")
        if (d / NODE_KEY).stat().st_mode & 0o077:
            raise SpecError(str(d / NODE_KEY), None, "the key is readable by others; chmod 600 it")
        files = cls(d, cert_name(d / NODE_CERT))
        files.server_context()  # a key that does not match its certificate fails here, not later
        return files

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._common(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Checks the server's certificate names the node connected to (server_hostname=NAME)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # check_hostname on
        self._common(ctx)
        return ctx

    def _common(self, ctx: ssl.SSLContext) -> None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (ssl.SSLError, OSError) as e:
            raise SpecError(str(self.dir), None, f"unusable certificate files: {e}") from e

    def criu_args(self) -> list[str]:
        """CRIU's page server / lazy-pages TLS flags. CRIU can check a name only against the
        address it connects to or listens on (opts.addr, on both ends), never a node name, so only
        the CA is checked (--tls-no-cn-verify): a peer must still hold a cluster certificate."""
        return ["--tls", "--tls-cacert", str(self.ca), "--tls-cert", str(self.cert),
                "--tls-key", str(self.key), "--tls-no-cn-verify"]


def cert_name(path: Path) -> str:
    """The node name (subject common name) of a certificate file."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise SpecError(str(path), None, f"not a PEM certificate: {e}") from e
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise SpecError(str(path), None, "the certificate has no common name (node name)")
    return str(names[0].value)


def peer_name(peercert: dict | None) -> str:
    """The node name in a verified peer certificate (ssl getpeercert()), or "" without one."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def handshake_error(e: ssl.SSLError | ssl.CertificateError, where: str, expected: str | None) -> TlsError:
    """A failed handshake as a typed error that says what was wrong, on which side."""
    reason = getattr(e, "verify_message", None) or getattr(e, "reason", None) or str(e)
    text = str(reason).lower().replace("_", " ")
    if "hostname mismatch" in text or "ip address mismatch" in text:
        why = f"its certificate does not name {expected!r}"
    elif "unable to get local issuer" in text or "self-signed" in text or "self signed" in text:
        why = "its certificate is not signed by this cluster's CA"
    elif "unknown ca" in text:
        why = "it does not accept our certificate (signed by another CA)"
    elif "certificate required" in text:
        why = "it requires a client certificate"
    elif "expired" in text:
        why = "a certificate has expired"
    else:
        why = str(reason)
    return TlsError(f"TLS handshake with {where} failed: {why}", peer=where, expected=expected,
                    reason=str(reason))


def closed_in_handshake(where: str, expected: str | None) -> TlsError:
    """TLS 1.3 ends the client's handshake before the server has checked the client's certificate;
    a server that refuses it closes the connection, and its alert is often lost on the way: the
    client sees the connection closed before the hello's answer."""
    return TlsError(f"TLS handshake with {where} failed: it closed the connection before answering "
                    "the hello: it does not accept our certificate (signed by another CA?)",
                    peer=where, expected=expected, reason="closed during the handshake")


# --- making certificates (pool certs) --------------------------------------------------------------
def _write_private(path: Path, data: bytes, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(data)


def _private_dir(d: Path) -> None:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)


def _refuse_existing(paths: list[Path], force: bool) -> None:
    there = [p for p in paths if p.exists()]
    if there and not force:
        raise FileExistsError(f"{there[0]} exists; not overwriting it (--force replaces it)")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: Path, *, name: str = "prewarm-pool cluster CA", days: int = CA_DAYS,
            force: bool = False) -> Path:
    """A new cluster CA in directory (ca.crt, ca.key 0600); returns the certificate's path."""
    _refuse_existing([directory / CA_CERT, directory / CA_KEY], force)
    _private_dir(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(directory / CA_KEY, _key_pem(key), force)
    (directory / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / CA_CERT


def issue(directory: Path, node: str, *, ip: str | None = None, days: int = NODE_DAYS,
          force: bool = False, out: Path | None = None) -> Path:
    """A key and a certificate for node, signed by directory's CA, in out (default directory/NODE/,
    0700) with a copy of ca.crt: the node's TLS directory. SAN: the node's name, and ip if given."""
    try:
        ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no cluster CA in {directory} ({Path(e.filename).name} missing): "
                                "run `pool certs init` first") from e
    sans: list[x509.GeneralName] = [x509.DNSName(node)]
    if ip is not None:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as e:
            raise ValueError(f"--ip: {ip!r} is not an IP address") from e
    out = out if out is not None else directory / node
    _refuse_existing([out / NODE_CERT, out / NODE_KEY], force)
    _private_dir(out)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(out / NODE_KEY, _key_pem(key), force)
    (out / NODE_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / CA_CERT).write_bytes((directory / CA_CERT).read_bytes())
    return out


def describe(path: Path) -> dict:
    """What `pool certs` prints about one certificate."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in san]
    except x509.ExtensionNotFound:
        names = []
    return {"path": str(path), "name": cert_name(path), "san": names,
            "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(timespec="seconds"),
            "sha256": cert.fingerprint(hashes.SHA256()).hex()}
