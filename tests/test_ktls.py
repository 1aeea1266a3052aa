"""Kernel TLS (`conduit_sidecar.ktls`): what a leg's socket is given for its sends
must be exactly what OpenSSL would encrypt the leg's next record with. Checked
without the kernel (this one may have no tls module): the next record OpenSSL
writes must decrypt under the key, IV and sequence number the kernel would get.
Legs that do send through the kernel: test_relay_tls.py and test_tls.py, in a
kernel that has the module (scripts/ktls-vm.sh)."""

import asyncio
import os
import ssl
import struct
import tempfile

import pytest
from conftest import HttpHead, run
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from conduit_sidecar import _relay, ktls, tlsleg
from conduit_sidecar.testing import CA

pytestmark = pytest.mark.skipif(not _relay.NATIVE_TLS,
                                reason="relay built without OpenSSL headers (uvloop's TLS is used)")


def _open(info: bytes, cipher: str, record: bytes) -> bytes:
    """Decrypts one TLS 1.3 record as the kernel would with the TLS_TX value `info`
    (RFC 8446 5.2: the nonce is the IV XOR the sequence number)."""
    kind, _, key_size, salt_size = ktls.CIPHERS[cipher]
    assert struct.unpack_from("=HH", info) == (0x0304, kind)
    iv_size = 12 - salt_size
    iv, key = info[4:4 + iv_size], info[4 + iv_size:4 + iv_size + key_size]
    salt, sequence = info[4 + iv_size + key_size:-8], info[-8:]
    nonce = bytes(a ^ b for a, b in zip(salt + iv, bytes(4) + sequence, strict=True))
    aead = ChaCha20Poly1305(key) if "CHACHA20" in cipher else AESGCM(key)
    return aead.decrypt(nonce, record[5:], record[:5])


def test_the_key_derivation_is_rfc_8448s():
    """RFC 8448, section 3: the server's application traffic keys."""
    secret = bytes.fromhex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
    info = ktls.crypto_info("TLS_AES_128_GCM_SHA256", secret, 7)
    assert info == (struct.pack("=HH", 0x0304, 51) + bytes.fromhex("dd83549aadf1e984")
                    + bytes.fromhex("9f02283b6c9c07efc26bb9f2ac92e356") + bytes.fromhex("cf782b88")
                    + (7).to_bytes(8, "big"))


def test_each_sides_next_record_is_encrypted_as_the_kernel_would(monkeypatch):
    """A handshake and an upgrade over loopback between two TLSStreams, as the
    sidecar runs them: the client sent its request (one record), the server its
    session tickets and the 101. On each side the next record OpenSSL writes opens
    under the secret the keylog callback kept and the records the stream counted,
    and under no other sequence number."""
    monkeypatch.setattr(ktls, "enabled", True)  # the streams keep their secrets
    with tempfile.TemporaryDirectory() as d:
        ca = CA()
        server_ctx = ca.server_context(d)
        client_ctx = ssl.create_default_context(cafile=ca.write(os.path.join(d, "ca.pem")))

    async def body():
        loop = asyncio.get_running_loop()
        answered = loop.create_future()

        class Upgrade(HttpHead):
            def data_received(self, data):
                super().data_received(data)
                if self.done.done() and not answered.done():
                    self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
                    answered.set_result(self.transport)

        server = await loop.create_server(lambda: tlsleg.TLSStream(server_ctx, Upgrade(), server_side=True),
                                          "127.0.0.1", 0)
        raw, head = await loop.create_connection(HttpHead, "127.0.0.1", server.sockets[0].getsockname()[1])
        client = await tlsleg.start_tls(raw, head, client_ctx, "127.0.0.1")
        head.transport = client
        client.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        server_stream = await answered
        await head.done  # the client read the tickets and the 101
        server.close()
        return client, server_stream

    client, server = run(body())
    assert (client.records, server.records) == (1, server_ctx.num_tickets + 1)
    for stream in (client, server):
        cipher = stream.sslobj.cipher()[0]
        secret = _relay.tls_take_secret(stream.sslobj)
        assert secret is not None and _relay.tls_take_secret(stream.sslobj) is None  # taken once
        stream.sslobj.write(b"next")
        record = stream.outgoing.read()
        assert _open(ktls.crypto_info(cipher, secret, stream.records), cipher, record) == b"next\x17"
        for wrong in (stream.records - 1, stream.records + 1):
            with pytest.raises(InvalidTag):
                _open(ktls.crypto_info(cipher, secret, wrong), cipher, record)
        stream.abort()


def test_a_context_that_logs_its_keys_keeps_its_own_callback(tmp_path):
    """A context that logs its keys (SSLKEYLOGFILE: Python's keylog_filename) keeps
    its callback: no secret is kept, so its legs stay OpenSSL's."""
    context = ssl.create_default_context()
    context.keylog_filename = str(tmp_path / "keys.log")
    assert not _relay.tls_keep_secrets(context)
    assert _relay.tls_keep_secrets(ssl.create_default_context())
