"""Throwaway certificate authorities and certificates for TLS tests, made by the
sidecar's own x509 builder (conduit_sidecar.tls)."""

import os

from conduit_sidecar.tls import certificate, new_key, pem, server_context


class CA:
    def __init__(self, name="conduit test CA"):
        self.key = new_key()
        self.cert = certificate(self.key, name=name, days=30, ca=True)

    def pem(self) -> bytes:
        return pem(self.cert)

    def write(self, path) -> str:
        with open(path, "wb") as f:
            f.write(self.pem())
        return str(path)

    def issue(self, directory, names=("127.0.0.1", "localhost"), stem="server") -> tuple[str, str]:
        """A leaf for `names`; returns (cert_file, key_file) written in `directory`."""
        key = new_key()
        cert = certificate(key, name=names[0], names=names, days=30, issuer=(self.key, self.cert))
        cert_file = os.path.join(directory, f"{stem}.crt")
        key_file = os.path.join(directory, f"{stem}.key")
        with open(cert_file, "wb") as f:
            f.write(pem(cert))
        with open(key_file, "wb") as f:
            f.write(pem(key))
        return cert_file, key_file

    def server_context(self, directory, names=("127.0.0.1", "localhost")):
        ctx = server_context()
        ctx.load_cert_chain(*self.issue(directory, names))
        return ctx
