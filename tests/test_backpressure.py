"""Backpressure: a peer that stops reading while the other streams 1 GB. The sidecar
stops reading the fast side (its write high-water mark is 64 KiB, plus one 256 KiB
read), so its memory stays flat, and the stream resumes intact when reading resumes."""

import asyncio
import json
import os
import socket
import ssl

import pytest
from conftest import (SidecarProcess, held_port, raw_upstream_sidecar, run, self_signed_tls, standard_keys,
                      switching_protocols)
from test_deployments import metric

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


# Deepgram's agent: the provider's first message (its Welcome) goes to the client before
# the relay starts; here one larger than the kernel takes for a client with a small window.
GREETING = b'{"type":"Welcome","pad":"' + b"x" * (6 << 20) + b'"}'
GREETED_FRAMES = 1024      # 64 MiB after it
SETTINGS = json.dumps({
    "type": "Settings", "audio": {"input": {"encoding": "linear16", "sample_rate": 16000}},
    "agent": {"listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
              "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}},
              "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}}}}).encode()


async def upgraded(sidecar, tls_port: int | None, cafile, path: str, auth: str, rcvbuf: int = 0):
    """A raw client upgraded on `path` (`auth`: its Authorization), on the wss listener
    at `tls_port` if given: (reader, writer) once the 101 is read."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", tls_port or sidecar.port))
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=ssl.create_default_context(cafile=cafile) if tls_port else None,
        server_hostname="127.0.0.1" if tls_port else None)
    writer.write((
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: {auth}\r\n\r\n"
    ).encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return reader, writer


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_a_greeting_the_client_has_not_read_still_holds_the_provider_back(tmp_path, tls):
    """The greeting was still in the client's transport when the relay took it over:
    the transport had paused its handshake protocol, not the relay's leg, so the leg
    never heard that its buffer was full and the provider's stream went into it unread
    (2 GB in 6 s). The relay now starts with the provider's reads paused until that
    buffer drains."""
    port, tls_port = held_port(), held_port()
    sidecar = SidecarProcess(
        str(tmp_path), f'[providers.deepgram_agent]\nurl = "ws://127.0.0.1:{port}/v1/agent/converse"\n'
        'secret_env = "PROVIDER_KEY"\n', standard_keys(),
        limits="max_message_bytes = 8388608\nfirst_message_bytes = 8388608",
        extra=self_signed_tls(tls_port, tmp_path / "ca.pem", tmp_path / "private")).start()
    settings_read, provider_done = asyncio.Event(), asyncio.Event()
    greeting = bytes([0x81, 127]) + len(GREETING).to_bytes(8, "big") + GREETING

    async def provider(reader, writer):
        writer.write(switching_protocols(await reader.readuntil(b"\r\n\r\n")))
        writer.write(greeting)
        await reader.read(65536)            # the client's Settings: the relay has started
        settings_read.set()
        for seq in range(GREETED_FRAMES):
            writer.write(frame(seq, masked=False))
            await writer.drain()
        await reader.read()                 # the sidecar's 1001 and its end, once the client left
        provider_done.set()

    async def body():
        async with await asyncio.start_server(provider, "127.0.0.1", port):
            reader, writer = await upgraded(  # a small receive buffer: the kernel takes little
                sidecar, tls_port if tls else None, tmp_path / "ca.pem", "/v1/agent/converse",
                f"Token {sidecar.keys.plain['good']}", rcvbuf=4096)
            writer.write(bytes([0x81, 0xfe]) + len(SETTINGS).to_bytes(2, "big") + MASK
                         + bytes(b ^ MASK[i & 3] for i, b in enumerate(SETTINGS)))
            await settings_read.wait()
            base, peak = await watch_rss(sidecar, STALL_SECONDS)    # the client reads nothing
            assert await asyncio.wait_for(reader.readexactly(len(greeting)), 30) == greeting
            checker = Checker(masked=False)
            while checker.seq < GREETED_FRAMES:
                data = await asyncio.wait_for(reader.read(1 << 20), 30)
                assert data, "the stream ended early"
                checker.feed(data)
            writer.transport.abort()
            await provider_done.wait()
            return base, peak, checker.seq
    try:
        base, peak, received = run(body(), timeout=120)
    finally:
        sidecar.stop()
    print(f"sidecar RSS while stalled: {base} -> {peak} KiB ({received} frames of 64 KiB intact)")
    assert received == GREETED_FRAMES
    assert peak - base < RSS_BOUND_KIB, (base, peak)


SESSIONS = 10
# Per session and direction the sidecar holds the high-water mark and one read (64 +
# 256 KiB, docs/hardening.md): twice that for allocator noise.
SESSION_BOUND_KIB = 2 * (64 + 256)


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_tiny_text_messages_cost_a_stalled_client_their_bytes_not_an_object_each(tmp_path, tls):
    """A provider's text messages are metered (sniffed for usage): each went to the
    client in a write of its own, a send each, and in a paused transport a bytes object
    each (on a TLS leg a record too): 10 sessions of 3-byte messages took 57-76 MB
    more on plain legs, and on TLS legs kept the sidecar too busy to answer /metrics
    within 5 s. Only a message with a marker is written on its own now (before
    on_message can close the session)."""
    port, tls_port = held_port(), held_port()
    sidecar = SidecarProcess(
        str(tmp_path), f'[providers.raw]\nurl = "ws://127.0.0.1:{port}/"\n', standard_keys(),
        extra=self_signed_tls(tls_port, tmp_path / "ca.pem", tmp_path / "private")).start()
    go, answered = asyncio.Event(), []
    tiny = b"\x81\x01x" * 20000

    async def provider(reader, writer):
        writer.write(switching_protocols(await reader.readuntil(b"\r\n\r\n")))
        answered.append(writer)
        await go.wait()
        try:
            while True:
                writer.write(tiny)
                await writer.drain()
        except ConnectionError:
            pass

    async def body():
        async with await asyncio.start_server(provider, "127.0.0.1", port):
            clients = []
            for _ in range(SESSIONS):
                clients.append(await upgraded(
                    sidecar, tls_port if tls else None, tmp_path / "ca.pem", "/v1/realtime/connect?provider=raw",
                    f"Bearer {sidecar.keys.plain['good']}"))
            while len(answered) < SESSIONS:
                await asyncio.sleep(0.01)
            base = peak = rss_kib(sidecar.proc.pid)
            go.set()
            relayed, still = None, 0
            while still < 10:       # until every session is held back: no frame relayed for 1 s
                await asyncio.sleep(0.1)
                peak = max(peak, rss_kib(sidecar.proc.pid))
                # (A sidecar relaying its first megabytes of 3-byte messages on a loaded
                # machine can take more than 5 s to answer.)
                before, relayed = relayed, metric(sidecar, "conduit_frames_total", timeout=30,
                                                  direction="upstream_to_client", kind="text")
                still = still + 1 if relayed == before else 0
            got = await asyncio.wait_for(clients[0][0].readexactly(len(tiny) * 10), 30)
            for _, writer in clients:
                writer.transport.abort()
            return base, peak, got
    try:
        base, peak, got = run(body(), timeout=120)
    finally:
        sidecar.stop()
    print(f"sidecar RSS while stalled: {base} -> {peak} KiB for {SESSIONS} sessions")
    assert got == tiny * 10
    assert peak - base < SESSIONS * SESSION_BOUND_KIB, (base, peak)
