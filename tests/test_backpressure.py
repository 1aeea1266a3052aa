"""Backpressure: a peer that stops reading while the other streams 1 GB. The sidecar
stops reading the fast side (its write high-water mark is 64 KiB, plus one 256 KiB
read), so its memory stays flat, and the stream resumes intact when reading resumes."""

import asyncio
import os
import socket

import pytest
from conftest import raw_upstream_sidecar, run, switching_protocols

TOTAL = int(os.environ.get("CONDUIT_BACKPRESSURE_BYTES", 1 << 30))
PAYLOAD = 65536
FRAMES = TOTAL // PAYLOAD
MASK = b"\x0a\x0b\x0c\x0d"
# The sidecar's RSS may not grow by more than this while one side is stalled; its
# buffers are per session (~64 KiB + 256 KiB per direction), the rest is allocator noise.
RSS_BOUND_KIB = 24 * 1024
STALL_SECONDS = 2.0


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def frame(seq: int, masked: bool) -> bytes:
    """A 64 KiB binary frame whose payload starts with its sequence number (the mask
    key XORs the rest to a constant, which is enough here)."""
    seq_bytes = seq.to_bytes(8, "big")
    head = bytes([0x82, (0x80 if masked else 0) | 127]) + PAYLOAD.to_bytes(8, "big")
    if masked:
        seq_bytes = bytes(b ^ MASK[i & 3] for i, b in enumerate(seq_bytes))
        return head + MASK + seq_bytes + bytes(PAYLOAD - 8)
    return head + seq_bytes + bytes(PAYLOAD - 8)


class Checker:
    """Counts frames in a byte stream and checks their sequence numbers."""

    def __init__(self, masked):
        self.hlen = 14 if masked else 10
        self.masked = masked
        self.pending = bytearray()
        self.seq = 0

    def feed(self, data):
        self.pending += data
        size = self.hlen + PAYLOAD
        while len(self.pending) >= size:
            assert self.pending[0] == 0x82, f"frame {self.seq}: lost or corrupted bytes"
            raw = bytes(self.pending[self.hlen:self.hlen + 8])
            if self.masked:
                raw = bytes(b ^ MASK[i & 3] for i, b in enumerate(raw))
            assert int.from_bytes(raw, "big") == self.seq, "lost, duplicated or reordered"
            self.seq += 1
            del self.pending[:size]


class Upstream(asyncio.Protocol):
    """Answers the upgrade, then either streams FRAMES frames (flow-controlled) or
    checks what it receives, stalling its reads at first."""

    def __init__(self, mode, state):
        self.mode, self.state, self.head, self.seq, self.paused = mode, state, b"", 0, False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.head is None:
            self.state["checker"].feed(data)
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        self.transport.write(switching_protocols(self.head))
        self.head = None
        self.state["upstream"] = self.transport
        if self.mode == "source":
            self.pump()

    def pump(self):
        while not self.paused and self.seq < FRAMES:
            self.transport.write(frame(self.seq, masked=False))
            self.seq += 1

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.pump()


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    sidecar = raw_upstream_sidecar(str(tmp_path_factory.mktemp("bp")), "max_message_bytes = 1048576")
    yield sidecar
    sidecar.stop()


async def client(sidecar):
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", sidecar.port))
    sock.setblocking(False)
    await loop.sock_sendall(sock, (
        "GET /v1/realtime/connect?provider=raw HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {sidecar.keys.plain['good']}\r\n\r\n"
    ).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


async def watch_rss(sidecar, seconds):
    base = peak = rss_kib(sidecar.proc.pid)
    for _ in range(int(seconds / 0.1)):
        await asyncio.sleep(0.1)
        peak = max(peak, rss_kib(sidecar.proc.pid))
    return base, peak


def test_client_stops_reading_while_the_provider_streams(relay):
    async def body():
        loop = asyncio.get_running_loop()
        state = {}
        async with await loop.create_server(lambda: Upstream("source", state), "127.0.0.1",
                                            relay.upstream_port):
            sock = await client(relay)
            base, peak = await watch_rss(relay, STALL_SECONDS)      # the client reads nothing
            checker = Checker(masked=False)
            while checker.seq < FRAMES:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 30)
                assert data, "the stream ended early"
                checker.feed(data)
            sock.close()
            return base, peak, checker.seq
    base, peak, received = run(body(), timeout=300)
    print(f"sidecar RSS while stalled: {base} -> {peak} KiB ({received} frames of 64 KiB intact)")
    assert received == FRAMES
    assert peak - base < RSS_BOUND_KIB, (base, peak)


def test_provider_stops_reading_while_the_client_streams(relay):
    async def body():
        loop = asyncio.get_running_loop()
        state = {"checker": Checker(masked=True)}
        async with await loop.create_server(lambda: Upstream("sink", state), "127.0.0.1",
                                            relay.upstream_port):
            sock = await client(relay)
            while "upstream" not in state:
                await asyncio.sleep(0.01)
            state["upstream"].pause_reading()

            async def send_all():
                batch = 64
                for start in range(0, FRAMES, batch):
                    await loop.sock_sendall(sock, b"".join(
                        frame(i, masked=True) for i in range(start, min(start + batch, FRAMES))))
            sender = asyncio.create_task(send_all())
            base, peak = await watch_rss(relay, STALL_SECONDS)
            state["upstream"].resume_reading()
            await asyncio.wait_for(sender, 120)
            while state["checker"].seq < FRAMES:
                await asyncio.sleep(0.05)
            sock.close()
            return base, peak, state["checker"].seq
    base, peak, received = run(body(), timeout=300)
    print(f"sidecar RSS while stalled: {base} -> {peak} KiB ({received} frames of 64 KiB intact)")
    assert received == FRAMES
    assert peak - base < RSS_BOUND_KIB, (base, peak)
