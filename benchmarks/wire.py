"""WebSocket bytes for the benchmark's own client and upstream (RFC 6455): frames
built in advance, the upgrade request and response, and a minimal header parser.

Nothing here is on a measured path per byte: frames are built before a run, and the
parser only reads headers.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10


def header(opcode: int, length: int, mask_key: bytes = b"") -> bytes:
    """A FIN frame header (§5.2); masked when `mask_key` is given."""
    b0, mbit = 0x80 | opcode, 0x80 if mask_key else 0
    if length < 126:
        h = struct.pack("!BB", b0, mbit | length)
    elif length < 65536:
        h = struct.pack("!BBH", b0, mbit | 126, length)
    else:
        h = struct.pack("!BBQ", b0, mbit | 127, length)
    return h + mask_key


def apply_mask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key, as one big-integer operation (no per-byte loop)."""
    n = len(payload)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def frame(payload: bytes, masked: bool, opcode: int = BINARY) -> bytes:
    """One whole frame; a client's frames are masked (§5.3), a server's are not."""
    if not masked:
        return header(opcode, len(payload)) + payload
    key = os.urandom(4)
    return header(opcode, len(payload), key) + apply_mask(payload, key)


def frames(size: int, count: int, masked: bool) -> bytes:
    """`count` binary frames of `size` payload bytes, concatenated."""
    return b"".join(frame(os.urandom(size), masked) for _ in range(count))


def parse_header(buf, pos: int, end: int):
    """(opcode, header length, payload length, mask key) of the frame at `pos`, or
    None while its header is incomplete."""
    if end - pos < 2:
        return None
    b1 = buf[pos + 1]
    length, hlen = b1 & 0x7F, 2
    if length == 126:
        hlen = 4
    elif length == 127:
        hlen = 10
    mlen = 4 if b1 & 0x80 else 0
    if end - pos < hlen + mlen:
        return None
    if hlen == 4:
        length = int.from_bytes(buf[pos + 2:pos + 4], "big")
    elif hlen == 10:
        length = int.from_bytes(buf[pos + 2:pos + 10], "big")
    key = bytes(buf[pos + hlen:pos + hlen + mlen])
    return buf[pos] & 0x0F, hlen + mlen, length, key


def request(path: str, host: str, headers: dict[str, str]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response(request_head: bytes) -> bytes:
    """The 101 answer to an upgrade request head (§4.2.2)."""
    for line in request_head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            accept = base64.b64encode(hashlib.sha1(value.strip() + _GUID).digest())
            return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    raise ValueError("no Sec-WebSocket-Key")
