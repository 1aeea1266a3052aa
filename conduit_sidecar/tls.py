"""TLS server side: the one place that sets up a server context or builds a certificate.

* `server_context()`: TLS 1.2+, for the loopback listener and the injection webhook.
  (Provider-leg client contexts are built by routing: verified, TLS 1.2+, no renegotiation.)
* `CertFiles`: a certificate and key loaded into one context and reloaded into it when
  the files change (cert-manager, a Secret volume): new handshakes get the new
  certificate, live connections go on.
* `ListenerTLS`: the loopback listener's certificate, from files or from `LoopbackCA`,
  a self-signed CA kept in `state_dir` whose certificate the app trusts (`ca_out`).
  Some clients dial only `wss://` (the OpenAI Node SDK rewrites any baseURL to wss).
* `new_key`, `certificate`, `pem`: the x509 builder (tests/certs.py uses it too).

cryptography is imported only when a certificate is built: `serve` with certificate
files, or without TLS, never loads it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import ssl
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .config import TLS, ConfigError
from .watch import FileWatch, read_regular

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "LOOPBACK_NAMES",
    "CertFiles",
    "ListenerTLS",
    "LoopbackCA",
    "certificate",
    "new_key",
    "pem",
    "server_context",
]

log = logging.getLogger("conduit.tls")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# The loopback CA lives 90 days. 45 days before it ends the next one is published
# beside it in ca_out, and 7 days before it ends the next one signs: a CA signs for
# 45 days, and an app keeps trusting the sidecar for at least 38 days (45 - 7) after
# it read ca_out, whenever it read it (83 if it read both).
CA_DAYS = 90
CA_OVERLAP_DAYS = 45
LEAF_DAYS = 7
LEAF_RENEW_DAYS = 2  # a leaf with fewer days left is re-issued
_SKEW = dt.timedelta(minutes=5)
MAX_PEM_BYTES = 1 << 20  # a Kubernetes Secret's limit


def server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class CertFiles:
    """A certificate chain and key in one server context; `check()` reloads them
    when either file changed. A bad pair at start raises ConfigError; later, the
    current certificate is kept (a renewal may be half written)."""

    def __init__(self, cert_file: str, key_file: str):
        self.cert_file, self.key_file = cert_file, key_file
        self.context = server_context()
        self.files = FileWatch(cert_file, key_file)
        self._load()

    def _load(self) -> None:
        try:
            # Into a spare context first: OpenSSL has already replaced the live one's
            # certificate by the time it finds the key does not match, leaving it none.
            # Both read one copy: a writer between the two loads (the next certificate
            # in place, its key still to come) would otherwise do just that.
            with _copies(self.cert_file, self.key_file) as (cert_file, key_file):
                server_context().load_cert_chain(cert_file, key_file)
                self.context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load {self.cert_file} / {self.key_file}: {exc}") from None

    def check(self) -> str | None:
        """The reload's result ("ok", "invalid"), None when the files did not change."""
        if not self.files.changed():
            return None
        try:
            self._load()
        except ConfigError as exc:
            self.files.after_failure(True)
            log.warning(
                "TLS certificate reload failed; keeping the current one",
                extra={"event": "tls_reload", "result": "invalid", "error": str(exc)},
            )
            return "invalid"
        self.files.after_failure(False)
        log.info("TLS certificate reloaded", extra={"event": "tls_reload", "result": "ok"})
        return "ok"


class ListenerTLS:
    """The loopback listener's context; `check()` (the server polls) renews the
    self-signed certificates when due and reloads changed files."""

    def __init__(self, conf: TLS):
        self.conf = conf
        self.authority: LoopbackCA | None = None
        if conf.self_signed:
            assert conf.state_dir and conf.ca_out  # config.load requires both
            self.authority = LoopbackCA(conf.state_dir, conf.ca_out)
        try:
            if self.authority:
                self.authority.renew()
        except OSError as exc:
            raise ConfigError(f"[tls] cannot write the self-signed CA: {exc}") from None
        except ValueError as exc:  # a file in state_dir that is not the PEM it wrote
            raise ConfigError(f"[tls] unreadable self-signed CA state in {conf.state_dir}: {exc}") from None
        cert_file, key_file = (
            (self.authority.cert_file, self.authority.key_file)
            if self.authority
            else (conf.cert_file, conf.key_file)
        )
        assert cert_file and key_file  # config.load requires both
        try:
            self.files = CertFiles(cert_file, key_file)
        except ConfigError as exc:
            raise ConfigError(f"[tls] {exc}") from None
        self.context = self.files.context
        # No TLS 1.3 session tickets: they are the only records a TLS 1.3 server sends
        # unasked once its handshake is done, and a threaded client (websockets' sync
        # client, OpenAI's sync realtime client) reads them in one thread while another
        # writes the request on the same SSL, which CPython does not serialise: about 1
        # connection in 1000 then never sends its request, or the client crashes
        # (README, "TLS on loopback"). Loopback clients rarely resume; TLS 1.2 keeps its
        # tickets (they come within the handshake).
        self.context.num_tickets = 0

    def check(self) -> str | None:
        """As CertFiles.check, after renewing the self-signed certificates when due."""
        if self.authority:
            try:
                self.authority.renew()
            except (OSError, ValueError) as exc:
                log.warning(
                    "self-signed certificate renewal failed",
                    extra={"event": "tls_renew", "result": "error", "error": str(exc)},
                )
        return self.files.check()

    @property
    def ready(self) -> bool:
        return self.authority is None or os.path.exists(self.authority.ca_out)


class LoopbackCA:
    """A CA in `state_dir` that signs only 127.0.0.1, ::1 and localhost (a critical
    Name Constraints extension says so), and the listener's leaf.

    `renew()` (at start and at each poll) keeps everything within its life:
    45 days before the CA expires a next CA is made and published beside it in
    `ca_out`; 7 days before, the next CA takes over and signs the leaf. The leaf
    lives 7 days and is re-issued with 2 left. An app that read `ca_out` before the
    next CA was published trusts only the old one: its new connections fail once the
    old CA stops signing, 38 days later at the earliest (restart it, or re-read
    `ca_out`, at least every 5 weeks).
    """

    def __init__(self, state_dir: str, ca_out: str):
        self.state_dir, self.ca_out = state_dir, ca_out
        self.cert_file = os.path.join(state_dir, "tls.crt")
        self.key_file = os.path.join(state_dir, "tls.key")
        # Nothing to do before `due` unless a file in state_dir changed, or the app's
        # copy did (deleted or overwritten in its shared volume: written again).
        self.files = FileWatch(*(self._path(n) for n in ("ca.crt", "next.crt", "tls.crt")), ca_out)
        self.due: dt.datetime | None = None

    def _path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def renew(self, now: dt.datetime | None = None) -> bool:
        """Make, rotate or re-issue what is due; True when the leaf was re-issued."""
        now = now or dt.datetime.now(dt.UTC)
        if not self.files.changed() and self.due is not None and now < self.due:
            return False
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        current, upcoming = self._load("ca"), self._load("next")
        leaf_days = dt.timedelta(days=LEAF_DAYS)
        if current is None or _left(current[1], now) < leaf_days:
            fresh = upcoming is not None and _left(upcoming[1], now) >= leaf_days
            current, upcoming = (upcoming if fresh else _loopback_ca(now)), None
            self._store("ca", *current)
            for name in ("next.crt", "next.key"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self._path(name))
        if upcoming is None and _left(current[1], now) < dt.timedelta(days=CA_OVERLAP_DAYS):
            upcoming = _loopback_ca(now)
            self._store("next", *upcoming)
        # The app's copy: CA certificates only, never a key.
        trusted = pem(current[1]) + (pem(upcoming[1]) if upcoming else b"")
        if _read(self.ca_out) != trusted:
            os.makedirs(os.path.dirname(os.path.abspath(self.ca_out)), exist_ok=True)
            _write(self.ca_out, trusted, 0o644)

        leaf = self._leaf()
        renewed = (
            leaf is None
            or _left(leaf, now) < dt.timedelta(days=LEAF_RENEW_DAYS)
            or not _signed_by(leaf, current[1])
        )
        if renewed:
            ca_key, ca_cert = current
            key = new_key()
            leaf = certificate(
                key, name="localhost", names=LOOPBACK_NAMES, days=LEAF_DAYS, issuer=(ca_key, ca_cert), now=now
            )
            _write(self.key_file, pem(key), 0o600)
            _write(self.cert_file, pem(leaf) + pem(ca_cert), 0o644)
            if self.due is not None:
                log.info("self-signed certificate renewed", extra={"event": "tls_renew", "result": "ok"})
        self.files.changed()  # our own writes are not news
        ca_end = current[1].not_valid_after_utc
        self.due = min(
            leaf.not_valid_after_utc - dt.timedelta(days=LEAF_RENEW_DAYS),
            ca_end - leaf_days if upcoming else ca_end - dt.timedelta(days=CA_OVERLAP_DAYS),
        )
        return renewed

    def _load(self, stem: str):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        key_data, cert_data = _read(self._path(stem + ".key")), _read(self._path(stem + ".crt"))
        if key_data is None or cert_data is None:
            return None
        cert = x509.load_pem_x509_certificate(cert_data)
        try:  # a CA from before the constraint (valid 10 years) is replaced
            cert.extensions.get_extension_for_class(x509.NameConstraints)
        except x509.ExtensionNotFound:
            return None
        return serialization.load_pem_private_key(key_data, None), cert

    def _store(self, stem: str, key, cert) -> None:
        _write(self._path(stem + ".key"), pem(key), 0o600)
        _write(self._path(stem + ".crt"), pem(cert), 0o644)

    def _leaf(self):
        from cryptography import x509

        data = _read(self.cert_file)
        return None if data is None else x509.load_pem_x509_certificate(data)


def _loopback_ca(now: dt.datetime):
    key = new_key()
    return key, certificate(
        key, name="conduit-sidecar loopback CA", days=CA_DAYS, ca=True, names=LOOPBACK_NAMES, now=now
    )


def _left(cert: x509.Certificate, now: dt.datetime) -> dt.timedelta:
    return cert.not_valid_after_utc - now


def _signed_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        leaf.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


# --- the x509 builder ----------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def certificate(
    key: ec.EllipticCurvePrivateKey,
    *,
    name: str,
    days: float,
    names: Sequence[str] = (),
    ca: bool = False,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A certificate for `key` with common name `name`, valid `days`, signed by
    `issuer` (key, certificate) or self-signed.

    A leaf is for TLS servers at `names` (DNS names or IP addresses, in its SAN).
    A CA (`ca=True`) may sign leaves only; with `names` it may sign only for those
    (a critical Name Constraints extension, one address per IP: /32 or /128).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer, issuer_name = (issuer[0], issuer[1].subject) if issuer else (key, subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    if ca and names:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[_general_name(n, network=True) for n in names], excluded_subtrees=None
            ),
            critical=True,
        )
    elif not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _general_name(name: str, network: bool = False):
    from cryptography import x509

    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return x509.DNSName(name)
    return x509.IPAddress(ipaddress.ip_network(address) if network else address)


def pem(obj) -> bytes:
    """A certificate or a private key (PKCS #8, unencrypted) in PEM."""
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    return obj.public_bytes(serialization.Encoding.PEM)


@contextlib.contextmanager
def _copies(*paths: str) -> Iterator[list[str]]:
    """Paths to copies of `paths` as they are now, for the block: files in memory
    (memfd, so a key is never written anywhere else), read through /proc. Where
    there are none (not Linux), the paths themselves."""
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        yield list(paths)
        return
    with contextlib.ExitStack() as stack:
        copies = []
        for path in paths:
            data = read_regular(path, MAX_PEM_BYTES)  # a FIFO would hold the event loop
            copy = stack.enter_context(os.fdopen(os.memfd_create("conduit-tls"), "wb"))
            copy.write(data)
            copy.flush()
            copies.append(f"/proc/self/fd/{copy.fileno()}")
        yield copies


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write(path: str, data: bytes, mode: int) -> None:
    """Atomic write: readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
