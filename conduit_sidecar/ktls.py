"""Kernel TLS for the send side of the relay's TLS legs (Linux's `tls` ULP, TLS 1.3).

Once a leg is handed to the relay, the kernel can encrypt what is sent on its socket:
a write is then one send(2) of plaintext, as on a plain leg, with no OpenSSL call and
no record copy. Reads stay OpenSSL's: a record that is not application data (a
session ticket, a key update, the peer's close_notify) makes recv(2) on a socket that
the kernel decrypts fail unless the caller asks for control messages, and uvloop
reads with recv.

What the kernel needs, and where it comes from:
* this side's first application traffic secret: the SSLContext's keylog callback
  keeps it in the SSL (`_relay.tls_keep_secrets`) until the handover takes it;
* the key and IV, derived from it as RFC 8446 (7.1, 7.3) says;
* the sequence number of the next record: the records this side sent under that
  secret, which `tlsleg.TLSStream` counts.
Where anything is missing (no `tls` module, TLS 1.2, a cipher the kernel lacks, a
key update before the handover, SSLKEYLOGFILE) the leg stays OpenSSL's.
"""

from __future__ import annotations

import errno
import hmac
import socket
import struct

from . import _relay

__all__ = ["CIPHERS", "crypto_info", "enabled", "send_in_kernel", "switch"]

SOL_TLS = 282
TLS_TX = 1
TCP_ULP = 31
_TLS_1_3 = 0x0304

# TLS 1.3 suite -> (the kernel's cipher type, its hash, key bytes, salt bytes: the
# part of the 12-byte IV the kernel takes apart from the rest).
CIPHERS = {
    "TLS_AES_128_GCM_SHA256": (51, "sha256", 16, 4),
    "TLS_AES_256_GCM_SHA384": (52, "sha384", 32, 4),
    "TLS_CHACHA20_POLY1305_SHA256": (54, "sha256", 32, 0),
}

enabled = False  # see switch()


def _expand_label(secret: bytes, label: bytes, length: int, digest: str) -> bytes:
    """HKDF-Expand-Label(secret, label, "", length), for lengths up to the hash's."""
    info = length.to_bytes(2, "big") + bytes([6 + len(label)]) + b"tls13 " + label + b"\0"
    return hmac.digest(secret, info + b"\1", digest)[:length]


def crypto_info(cipher: str, secret: bytes, sequence: int) -> bytes:
    """The TLS_TX option's value (a struct tls12_crypto_info_* of <linux/tls.h>) for
    records of `cipher` under `secret`, the next one numbered `sequence`."""
    kind, digest, key_size, salt_size = CIPHERS[cipher]
    key = _expand_label(secret, b"key", key_size, digest)
    iv = _expand_label(secret, b"iv", 12, digest)
    head = struct.pack("=HH", _TLS_1_3, kind)
    return head + iv[salt_size:] + key + iv[:salt_size] + sequence.to_bytes(8, "big")


def send_in_kernel(sock, cipher: str, secret: bytes, sequence: int) -> None:
    """The kernel encrypts what is sent on `sock` from now on. Raises OSError, and
    then the socket's sends are as they were (a `tls` ULP with no key passes them)."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    sock.setsockopt(SOL_TLS, TLS_TX, crypto_info(cipher, secret, sequence))


def probe() -> str | None:
    """None when this kernel encrypts TLS 1.3 sends (tried on a loopback connection),
    else why not."""
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname()) as sock:
                send_in_kernel(sock, "TLS_AES_128_GCM_SHA256", bytes(32), 0)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "this kernel has no tls module"
        return f"the kernel refused it: {exc.strerror or exc}"
    return None


def switch(wanted: bool) -> str | None:
    """Kernel TLS for the legs handed over from now on, if `wanted` and possible;
    returns why it is off (None: on)."""
    global enabled
    if not wanted:
        reason: str | None = "off in the configuration"
    elif not _relay.NATIVE_TLS:
        reason = "uvloop encrypts the TLS legs (relay built without OpenSSL headers)"
    else:
        reason = probe()
    enabled = reason is None
    return reason
