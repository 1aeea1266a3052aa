"""TLS for the loopback listener: certificate files reloaded on change, or a
self-signed CA kept in `state_dir` with a fresh leaf for 127.0.0.1, ::1 and
localhost. (Provider-leg contexts are built by routing: verified, TLS 1.2+.)

Some clients dial only `wss://` (the OpenAI Node SDK rewrites any baseURL to wss),
so the sidecar offers TLS on loopback; the app trusts the CA from `ca_out`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import ssl

from .config import TLS, ConfigError
from .watch import file_signature

__all__ = ["ListenerTLS"]

log = logging.getLogger("conduit.tls")


class ListenerTLS:
    """The listener's SSLContext. `check()` reloads changed certificate files into
    the same context: new handshakes get the new certificate, live sessions go on."""

    def __init__(self, conf: TLS):
        self.conf = conf
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        if conf.self_signed:
            self.cert_file, self.key_file = _self_signed(conf.state_dir, conf.ca_out)
        else:
            self.cert_file, self.key_file = conf.cert_file, conf.key_file
        self.signature = self._signature()
        self._load()

    def _signature(self):
        return file_signature(self.cert_file), file_signature(self.key_file)

    def _load(self):
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[tls] cannot load {self.cert_file} / {self.key_file}: {exc}") from None

    def check(self) -> None:
        signature = self._signature()
        if signature == self.signature:
            return
        self.signature = signature
        try:
            self._load()
        except ConfigError as exc:
            log.warning("TLS certificate reload failed; keeping the current one",
                        extra={"event": "tls_reload", "result": "invalid", "error": str(exc)})
            return
        log.info("TLS certificate reloaded", extra={"event": "tls_reload", "result": "ok"})

    @property
    def ready(self) -> bool:
        return not self.conf.self_signed or os.path.exists(self.conf.ca_out)


def _self_signed(state_dir: str, ca_out: str) -> tuple[str, str]:
    """Reuse (or make) the CA in state_dir, write its certificate to ca_out, and
    issue a new leaf. Returns the leaf's (cert_file, key_file), both in state_dir."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    ca_key_path = os.path.join(state_dir, "ca.key")
    ca_cert_path = os.path.join(state_dir, "ca.crt")
    now = dt.datetime.now(dt.timezone.utc)
    if os.path.exists(ca_key_path) and os.path.exists(ca_cert_path):
        with open(ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
        with open(ca_cert_path, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "conduit-sidecar loopback CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _write(ca_key_path, ca_key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), 0o600)
        _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=397))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    cert_file = os.path.join(state_dir, "tls.crt")
    key_file = os.path.join(state_dir, "tls.key")
    _write(key_file, leaf_key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()), 0o600)
    _write(cert_file, leaf.public_bytes(serialization.Encoding.PEM)
           + ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    # The app's copy: the CA certificate only, never a key.
    os.makedirs(os.path.dirname(os.path.abspath(ca_out)), exist_ok=True)
    _write(ca_out, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_file, key_file


def _write(path: str, data: bytes, mode: int) -> None:
    """Atomic write: readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
