"""The relay's own TLS legs (`_relay.NATIVE_TLS`): both legs TLS, the relay in this
process between a websockets client (wss) and an upstream over loopback, the
handshakes run by `tlsleg` as the sidecar runs them. Byte-exact transfers, the
closing handshake with close_notify, and a provider whose TLS breaks. Where the
kernel has kernel TLS (scripts/ktls-vm.sh) the legs send through it, as in the
sidecar.

No sidecar process: scripts/asan.sh runs it on the sanitized build."""

import asyncio
import base64
import ctypes
import ctypes.util
import os
import socket
import ssl
import subprocess
import sys
import tempfile

import pytest
from conftest import HttpHead, UpgradeAnswer, run, switching_protocols
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from conduit_sidecar import _relay, ktls, tlsleg
from conduit_sidecar.testing import CA

pytestmark = pytest.mark.skipif(not _relay.NATIVE_TLS,
                                reason="relay built without OpenSSL headers (uvloop's TLS is used)")


@pytest.fixture(autouse=True)
def kernel_tls(monkeypatch):
    """The legs' sends go to the kernel where it can take them, as in the sidecar."""
    monkeypatch.setattr(ktls, "enabled", ktls.probe() is None)


@pytest.fixture(scope="module")
def pki():
    with tempfile.TemporaryDirectory() as d:
        ca = CA()
        cafile = ca.write(os.path.join(d, "ca.pem"))
        server = ca.server_context(d)
        client = ssl.create_default_context(cafile=cafile)
        yield server, client


def _upgrade_request() -> bytes:
    """A WebSocket upgrade request for "/", with a fresh key."""
    return (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n\r\n")


async def _front(pki, up_port, client_kernel_tx=None):
    """A wss listener whose sessions the relay carries to wss://127.0.0.1:up_port;
    returns (port, a future of the first relay and its legs' SSLObjects). Each leg's
    sends must be the kernel's where it can take them (`client_kernel_tx`: unless the
    test says otherwise for the client leg)."""
    server_ctx, client_ctx = pki
    loop = asyncio.get_running_loop()
    relays = loop.create_future()

    async def session(head_proto):
        head = await head_proto.done
        raw, up = await loop.create_connection(HttpHead, "127.0.0.1", up_port)
        upstream = await tlsleg.start_tls(raw, up, client_ctx, "127.0.0.1")
        up.transport = upstream
        upstream.write(_upgrade_request())
        response = await up.done
        client = head_proto.transport
        client.write(switching_protocols(head))
        relay = _relay.Relay(loop, 1 << 30, 2.0, lambda r: None)
        client, client_tls, client_kernel = tlsleg.handover(client)
        upstream, upstream_tls, upstream_kernel = tlsleg.handover(upstream)
        assert client_tls is not None and upstream_tls is not None
        assert upstream_kernel == ktls.enabled
        assert client_kernel == (ktls.enabled if client_kernel_tx is None else client_kernel_tx)
        relay.start(client, upstream, b"", response.split(b"\r\n\r\n", 1)[1],
                    client_tls, upstream_tls, client_kernel, upstream_kernel)
        client.resume_reading()
        upstream.resume_reading()
        if not relays.done():
            relays.set_result((relay, client_tls, upstream_tls))

    def accept():
        head = HttpHead()
        loop.create_task(session(head))
        return tlsleg.TLSStream(server_ctx, head, server_side=True)

    server = await loop.create_server(accept, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1], relays


def _tls_upstream(handler, pki):
    """A websockets server with TLS (the test CA's leaf) for the relay's provider leg."""
    return serve(handler, "127.0.0.1", 0, ssl=pki[0], compression=None, max_size=None, ping_interval=None)


def _client(port, pki):
    return connect(f"wss://127.0.0.1:{port}/", ssl=pki[1], compression=None, max_size=None,
                   ping_interval=None)


async def _echo(ws):
    async for message in ws:
        await ws.send(message)


def test_byte_exact_both_ways_through_two_tls_legs(pki):
    async def body():
        async with _tls_upstream(_echo, pki) as up:
            port, _ = await _front(pki, up.sockets[0].getsockname()[1])
            async with _client(port, pki) as ws:
                for size in (0, 1, 125, 16383, 16384, 16385, 65536, 1 << 20, 16 << 20):
                    payload = os.urandom(size)
                    await ws.send(payload)
                    assert await ws.recv() == payload
                text = "é" * 100_000
                await ws.send(text)
                assert await ws.recv() == text
                # Many frames in one read, and records split across reads.
                burst = [os.urandom(960) for _ in range(2000)]
                for m in burst:
                    await ws.send(m)
                for m in burst:
                    assert await ws.recv() == m
            return ws.close_code, ws.close_reason
    assert run(body()) == (1000, "")


async def _trickle(port: int, piece: int = 5):
    """A TCP proxy to 127.0.0.1:port that forwards what it reads `piece` bytes per
    write, one write per loop turn: the relay's leg reads each TLS record in parts
    (its header alone, then pieces of its body)."""
    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                for i in range(0, len(data), piece):
                    writer.write(data[i:i + piece])
                    await writer.drain()
                    await asyncio.sleep(0)
        finally:
            writer.close()

    async def proxy(reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(proxy, "127.0.0.1", 0)


def test_records_read_in_parts_on_both_legs(pki):
    """Between reads the relay hands an idle leg's record buffers back to OpenSSL
    (`TLS_BUFFERS_RELEASED`); a record whose first part was read must keep its buffer.
    Every record on both legs arrives in 5-byte parts: each message comes back whole."""
    async def body():
        async with _tls_upstream(_echo, pki) as up:
            provider = await _trickle(up.sockets[0].getsockname()[1])
            port, _ = await _front(pki, provider.sockets[0].getsockname()[1])
            client = await _trickle(port)
            async with _client(client.sockets[0].getsockname()[1], pki) as ws:
                for size in (1, 300, 16385):
                    payload = os.urandom(size)
                    await ws.send(payload)
                    assert await ws.recv() == payload
            return ws.close_code
    assert run(body()) == 1000


# A TLS 1.3 server that sends its session tickets after each handshake and then
# reads and writes nothing: a provider that never answers the upgrade.
_SILENT_PROVIDER = """
import socket, ssl, sys
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
held = []
while True:
    held.append(context.wrap_socket(server.accept()[0], server_side=True))
"""

# Provider legs as the sidecar opens them, waiting for their 101: what each adds to
# the heap (bytes malloc handed out and has not had back: glibc's mallinfo2, or
# ASan's count where its allocator replaces glibc's, scripts/asan.sh). A process of
# its own: frees of an earlier test's objects would count against it.
_WAITING_LEGS = """
import asyncio, ctypes, gc, ssl, sys
from conduit_sidecar import _relay, tlsleg
port, cafile, kept, count = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "kept", 40
if kept:
    _relay.tls_free_buffers = lambda sslobj: False

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

def live():
    process = ctypes.CDLL(None)
    if hasattr(process, "__sanitizer_get_current_allocated_bytes"):
        process.__sanitizer_get_current_allocated_bytes.restype = ctypes.c_size_t
        return process.__sanitizer_get_current_allocated_bytes()
    process.mallinfo2.restype = MallInfo2
    info = process.mallinfo2()
    return info.uordblks + info.hblkhd

class App(asyncio.Protocol):
    def data_received(self, data): pass
    def connection_lost(self, exc): pass

async def main():
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context(cafile=cafile)
    async def leg():
        raw, app = await loop.create_connection(App, "127.0.0.1", port)
        stream = await tlsleg.start_tls(raw, app, context, "127.0.0.1")
        stream.write(b"GET / HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
        return stream
    await leg()  # one-off allocations (the context's, OpenSSL's) before the count
    await asyncio.sleep(0.2)
    gc.collect()
    before = live()
    streams = [await leg() for _ in range(count)]
    await asyncio.sleep(0.5)  # the tickets arrive and are read
    gc.collect()
    grown = (live() - before) / count
    assert all(stream.sslobj.session.has_ticket for stream in streams)
    print(grown)

asyncio.run(main())
"""


@pytest.mark.skipif(not _relay.TLS_BUFFERS_RELEASED, reason="this OpenSSL's SSL_free_buffers is not safe")
def test_a_provider_leg_waiting_for_its_101_keeps_no_read_buffer_after_the_tickets(tmp_path):
    """A TLS 1.3 server sends its session tickets after the handshake. Reading them
    sets up OpenSSL's 16 KiB read buffer, which SSL_MODE_RELEASE_BUFFERS frees only
    after application data: a provider leg waiting for its 101 (a slow provider, a
    burst of openings) would hold it. The stream hands it back: 40 legs to a silent
    provider hold 12 KiB or more less each than with that call left out."""
    ca = CA()
    cafile = ca.write(tmp_path / "ca.pem")
    provider = subprocess.Popen([sys.executable, "-c", _SILENT_PROVIDER, *ca.issue(tmp_path)],
                                stdout=subprocess.PIPE)
    try:
        port = provider.stdout.readline().decode().strip()

        def grown(mode):
            out = subprocess.run([sys.executable, "-c", _WAITING_LEGS, port, cafile, mode],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return float(out.stdout)

        kept, handed_back = grown("kept"), grown("handed back")
        print(f"heap per waiting leg: {kept / 1024:.1f} KiB with the read buffer kept, "
              f"{handed_back / 1024:.1f} handed back")
    finally:
        provider.kill()
        provider.wait()
    assert kept - handed_back >= 12 * 1024, (kept, handed_back)


def test_buffers_are_handed_back_only_where_openssl_fixed_cve_2024_4741():
    fixed = {0x300000e0, 0x30100060, 0x30200020, 0x30300010, 0x30400000, 0x30500010}
    unsafe = {0x1010117f, 0x30000000, 0x300000d0, 0x30100050, 0x30200010, 0x30300000}
    assert {v for v in fixed | unsafe if _relay.tls_buffers_releasable(v)} == fixed


def test_slow_reader_gets_every_byte(pki):
    """64 MiB from the provider to a client that reads slowly: the relay's writes
    meet a full socket (backpressure on a TLS leg) and lose or corrupt nothing."""
    chunk = os.urandom(1 << 20)

    async def flood(ws):
        await ws.recv()
        for i in range(64):
            await ws.send(bytes([i]) + chunk)

    async def body():
        async with _tls_upstream(flood, pki) as up:
            port, _ = await _front(pki, up.sockets[0].getsockname()[1])
            async with _client(port, pki) as ws:
                await ws.send("go")
                for i in range(64):
                    if i % 8 == 0:
                        await asyncio.sleep(0.2)
                    assert await ws.recv() == bytes([i]) + chunk
    run(body())


class _BrokenUpstream(asyncio.Protocol):
    """A TLS upstream that answers the upgrade, then either sends a record that does
    not decrypt or ends TLS with close_notify (no WebSocket close)."""

    def __init__(self, server_ctx, how):
        self.how = how
        self.stream = tlsleg.TLSStream(server_ctx, self, server_side=True)
        self.head = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.transport.write(switching_protocols(self.head))
            self.transport.write(b"\x81\x02hi")
            asyncio.get_running_loop().call_later(0.1, self.fail)

    def fail(self):
        if self.how.startswith("bad record"):
            # An application-data record whose tag cannot verify.
            self.stream.raw.write(b"\x17\x03\x03\x00\x20" + os.urandom(32))
            if self.how == "bad record, alert unread":
                # A provider that does not act on the relay's alert (the kernel's sends
                # send none): its connection stays until the relay drops it.
                self.stream.raw.set_protocol(asyncio.Protocol())
        else:
            self.stream.close()


@pytest.mark.parametrize("how", ["bad record", "bad record, alert unread", "close_notify"])
def test_upstream_tls_ends_without_a_close_frame_gives_1014(pki, how):
    async def body():
        loop = asyncio.get_running_loop()
        up = await loop.create_server(lambda: _BrokenUpstream(pki[0], how).stream,
                                      "127.0.0.1", 0)
        port, relays = await _front(pki, up.sockets[0].getsockname()[1])
        async with _client(port, pki) as ws:
            assert await ws.recv() == "hi"
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosed as closed:
                relay, _, _ = await relays
                return closed.rcvd.code, closed.rcvd.reason, relay.close_reason
    code, reason, relay_reason = run(body())
    assert (code, reason) == (1014, "upstream connection lost")
    assert relay_reason == "upstream connection lost"


class _EagerUpstream(UpgradeAnswer):
    """A TLS upstream whose 101 and first frames are records of one write: the
    handshake's stream decrypts the 101 and leaves the frames' records unread."""

    def __init__(self, server_ctx):
        super().__init__()
        self.stream = tlsleg.TLSStream(server_ctx, self, server_side=True)

    def answer(self, head):
        for record in (switching_protocols(head), b"\x81\x05first", b"\x81\x06second"):
            self.stream.sslobj.write(record)
        self.stream._flush()


def test_records_left_by_the_upgrade_are_relayed_first(pki):
    async def body():
        loop = asyncio.get_running_loop()
        up = await loop.create_server(lambda: _EagerUpstream(pki[0]).stream, "127.0.0.1", 0)
        port, _ = await _front(pki, up.sockets[0].getsockname()[1])
        async with _client(port, pki) as ws:
            return [await asyncio.wait_for(ws.recv(), 5) for _ in range(2)]
    assert run(body()) == ["first", "second"]


libssl = ctypes.CDLL(ctypes.util.find_library("ssl"))


def ssl_pointer(sslobj):
    """The SSL* of an ssl.SSLObject or ssl.SSLSocket, for libssl's calls that Python's
    ssl lacks (through ctypes, with the layout _tls.h relies on)."""
    return ctypes.c_void_p.from_address(
        id(sslobj._sslobj) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p))


def _request_key_update(sslobj):
    """SSL_key_update(SSL_KEY_UPDATE_REQUESTED). Sent with the next write."""
    assert libssl.SSL_key_update(ssl_pointer(sslobj), 1) == 1


class _KeyUpdatingUpstream(UpgradeAnswer):
    """After the upgrade, at the first frame it reads, asks for a TLS key update and
    sends "after"; at each later frame, "more"; a close it answers."""

    def __init__(self, server_ctx):
        super().__init__()
        self.stream = tlsleg.TLSStream(server_ctx, self, server_side=True)
        self.frames = 0

    def data_received(self, data):
        if self.head is not None:
            return super().data_received(data)
        if data[:1] == b"\x88":
            return self.transport.write(b"\x88\x02\x03\xe8")
        self.frames += 1
        if self.frames == 1:
            _request_key_update(self.stream.sslobj)
        self.transport.write(b"\x81\x05after" if self.frames == 1 else b"\x81\x04more")


def test_a_key_update_the_provider_requests(pki):
    """OpenSSL's leg answers it (at its next write) and goes on under the new keys. A
    leg whose sends the kernel encrypts cannot answer: after the frames read with the
    request it is dropped, and the client gets 1014."""
    async def body():
        loop = asyncio.get_running_loop()
        up = await loop.create_server(lambda: _KeyUpdatingUpstream(pki[0]).stream, "127.0.0.1", 0)
        port, _ = await _front(pki, up.sockets[0].getsockname()[1])
        got = []
        try:
            async with _client(port, pki) as ws:
                for _ in range(3):
                    await ws.send("go")
                    got.append(await asyncio.wait_for(ws.recv(), 5))
        except ConnectionClosed as closed:
            return got, closed.rcvd.code, closed.rcvd.reason
        return got, ws.close_code, ws.close_reason
    got, code, reason = run(body())
    if ktls.enabled:  # "after" came with the request: delivered, unless a read split them
        assert got in ([], ["after"]) and (code, reason) == (1014, "upstream connection lost")
    else:
        assert (got, code, reason) == (["after", "more", "more"], 1000, "")


class _Collect(asyncio.Protocol):
    def __init__(self):
        self.data = b""

    def data_received(self, data):
        self.data += data


async def _until(cond):
    while not cond():
        await asyncio.sleep(0.01)


def test_a_key_update_requested_before_the_handover_keeps_the_leg_openssls(pki):
    """A client asks for a key update with its upgrade request: the 101 goes out
    after OpenSSL's answer, under keys past the ones the handshake kept, so that
    leg's sends stay OpenSSL's (`_front` checks) and the session works."""
    async def body():
        loop = asyncio.get_running_loop()
        async with _tls_upstream(_echo, pki) as up:
            port, _ = await _front(pki, up.sockets[0].getsockname()[1], client_kernel_tx=False)
            raw, client = await loop.create_connection(_Collect, "127.0.0.1", port)
            stream = await tlsleg.start_tls(raw, client, pki[1], "127.0.0.1")
            _request_key_update(stream.sslobj)
            stream.write(_upgrade_request())
            await asyncio.wait_for(_until(lambda: b"\r\n\r\n" in client.data), 5)
            stream.write(b"\x81\x82\x00\x00\x00\x00hi")  # "hi", masked with a zero key
            await asyncio.wait_for(_until(lambda: client.data.endswith(b"\x81\x02hi")), 5)
            stream.abort()
            return client.data.split(b"\r\n", 1)[0]
    assert run(body()) == b"HTTP/1.1 101 Switching Protocols"


def test_a_stream_reads_its_socket_again_only_once_its_records_are_taken(pki):
    """A TLSStream's app that takes a piece, pauses, and resumes a loop turn later
    (the injection webhook reads a body so): whatever the peer sends meanwhile, the
    stream holds at most one socket read of records, not all that was sent (as when
    the socket was resumed along with the app: 200 MB in the webhook's slow-body
    attack on a loaded machine)."""
    total = 16 << 20

    async def body():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        got, most = 0, 0

        class Slow(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                nonlocal got, most
                got += len(data)
                most = max(most, stream.incoming.pending)
                self.transport.pause_reading()
                loop.call_soon(self.transport.resume_reading)
                if got >= total and not done.done():
                    done.set_result(None)

        def accept():
            nonlocal stream
            stream = tlsleg.TLSStream(pki[0], Slow(), server_side=True)
            return stream

        stream = None
        server = await loop.create_server(accept, "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1],
                                                  ssl=pki[1], server_hostname="127.0.0.1")
        writer.write(os.urandom(total))
        await asyncio.wait_for(done, 30)
        writer.close()
        server.close()
        return most
    assert run(body()) <= 512 * 1024


def test_a_closed_stream_ends_even_if_its_peer_never_reads(pki, monkeypatch):
    """close() sends what was written before the socket closes, and uvloop's transport
    waits for that as long as the peer takes to read it: for ever, for a peer that
    never reads. The injection webhook's connections so closed (three 1.3 MB answers
    read by nobody, the last with `Connection: close`) stayed open, uncounted, +2.8 MB
    each, as many as a client opened. A closed stream now ends within _CLOSE_SECONDS
    (5 s; 0.5 s here)."""
    monkeypatch.setattr(tlsleg, "_CLOSE_SECONDS", 0.5)

    async def body():
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        class Answer(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                self.transport.write(bytes(8 << 20))  # more than the kernel takes for a peer
                self.transport.close()

            def connection_lost(self, exc):
                ended.set_result(None)

        def client():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            tls = pki[1].wrap_socket(sock, server_hostname="127.0.0.1")
            tls.sendall(b"answer me")
            return tls  # and never read

        server = await loop.create_server(lambda: tlsleg.TLSStream(pki[0], Answer(), server_side=True),
                                          "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tls = await loop.run_in_executor(None, client)
        try:
            await asyncio.wait_for(ended, 10)
        finally:
            tls.close()
            server.close()
    run(body())


class _Ending:
    """How a peer's TLS ended: "close_notify" if it read one (its stream's EOF), else
    "no close_notify" (the TCP connection ended first, or a record did not decrypt)."""

    def connection_made(self, transport):
        self.transport = transport
        self.ended = asyncio.get_running_loop().create_future()

    def eof_received(self):
        if not self.ended.done():
            self.ended.set_result("close_notify")
        return False

    def connection_lost(self, exc):
        if not self.ended.done():
            self.ended.set_result("no close_notify")


class _ClosingUpstream(_Ending, UpgradeAnswer):
    """Answers the upgrade, then a close frame with its own."""

    def data_received(self, data):
        if self.head is None and data[:1] == b"\x88":
            self.transport.write(b"\x88\x02\x03\xe8")
        super().data_received(data)


class _ClosingClient(_Ending, _Collect):
    pass


def test_each_leg_ends_with_a_close_notify_its_peer_reads(pki):
    """After the closing handshake each TLS leg sends close_notify before its TCP
    close, and each peer decrypts it (OpenSSL's record, or the kernel's)."""
    async def body():
        loop = asyncio.get_running_loop()
        upstream = _ClosingUpstream()
        up = await loop.create_server(lambda: tlsleg.TLSStream(pki[0], upstream, server_side=True),
                                      "127.0.0.1", 0)
        port, _ = await _front(pki, up.sockets[0].getsockname()[1])
        raw, client = await loop.create_connection(_ClosingClient, "127.0.0.1", port)
        stream = await tlsleg.start_tls(raw, client, pki[1], "127.0.0.1")
        client.transport = stream
        stream.write(_upgrade_request())
        await asyncio.wait_for(_until(lambda: b"\r\n\r\n" in client.data), 5)
        stream.write(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # close 1000, masked
        ends = await asyncio.wait_for(asyncio.gather(client.ended, upstream.ended), 5)
        up.close()
        return ends, client.data.split(b"\r\n\r\n", 1)[1]
    assert run(body()) == (["close_notify", "close_notify"], b"\x88\x02\x03\xe8")


def _end_tls(stream, fin):
    """A peer's end of its side: close_notify (it still reads), and its TCP FIN if `fin`."""
    with pytest.raises(ssl.SSLWantReadError):   # (the peer's close_notify is not awaited)
        stream.sslobj.unwrap()
    stream._flush()
    if fin:
        stream.raw.write_eof()


class _LateAnswerUpstream(_Ending, UpgradeAnswer):
    """Answers a close 0.2 s later, after a last message."""

    def data_received(self, data):
        if self.head is None and data[:1] == b"\x88":
            asyncio.get_running_loop().call_later(0.2, self.transport.write,
                                                  b"\x81\x04last\x88\x02\x03\xe8")
        super().data_received(data)


@pytest.mark.parametrize("how", ["close_notify", "and FIN", "TLS 1.2"])
def test_a_tls_client_that_ends_its_side_after_its_close_still_gets_the_providers_answer(pki, how):
    """The client sends its close, then its close_notify (and its FIN): it still reads.
    The provider's last message and its answer to the close reach it, then our
    close_notify. The relay shut the leg at the client's close_notify, so the client
    never got the answer to its close (1006 where the provider said 1000). Under TLS
    1.2 a close_notify is still answered at once, pending writes dropped (RFC 5246)."""
    client_ctx = pki[1]
    if how == "TLS 1.2":
        client_ctx = ssl.create_default_context(cadata=b"".join(pki[1].get_ca_certs(binary_form=True)))
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2

    async def body():
        loop = asyncio.get_running_loop()
        upstream = _LateAnswerUpstream()
        up = await loop.create_server(lambda: tlsleg.TLSStream(pki[0], upstream, server_side=True),
                                      "127.0.0.1", 0)
        # (Kernel TLS is taken for TLS 1.3 only: a TLS 1.2 client leg stays the relay's.)
        port, _ = await _front(pki, up.sockets[0].getsockname()[1],
                               client_kernel_tx=False if how == "TLS 1.2" else None)
        raw, client = await loop.create_connection(_ClosingClient, "127.0.0.1", port)
        stream = await tlsleg.start_tls(raw, client, client_ctx, "127.0.0.1")
        client.transport = stream
        stream.write(_upgrade_request())
        await asyncio.wait_for(_until(lambda: b"\r\n\r\n" in client.data), 5)
        stream.write(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # close 1000, masked
        _end_tls(stream, fin=how == "and FIN")
        end = await asyncio.wait_for(client.ended, 5)
        up.close()
        return end, client.data.split(b"\r\n\r\n", 1)[1]
    answer = b"" if how == "TLS 1.2" else b"\x81\x04last\x88\x02\x03\xe8"
    assert run(body()) == ("close_notify", answer)


class _HalfClosingUpstream(_Ending, UpgradeAnswer):
    """At the client's first frame: a close, then the end of its side (`_end_tls`);
    collects what it reads after."""

    def __init__(self, fin):
        super().__init__()
        self.fin = fin
        self.data = b""

    def data_received(self, data):
        if self.head is not None:
            return super().data_received(data)
        if not self.data:
            self.transport.write(b"\x88\x05\x03\xe8bye")
            _end_tls(self.transport, self.fin)
        self.data += data


@pytest.mark.parametrize("fin", [False, True], ids=["close_notify", "and FIN"])
def test_a_tls_provider_that_ends_its_side_after_its_close_still_gets_the_clients_answer(pki, fin):
    """The same from the provider: its close, its close_notify (and FIN). The client's
    answer to that close reaches it (the relay had shut the provider's leg at its
    close_notify, before the client could answer)."""
    async def body():
        loop = asyncio.get_running_loop()
        upstream = _HalfClosingUpstream(fin)
        up = await loop.create_server(lambda: tlsleg.TLSStream(pki[0], upstream, server_side=True),
                                      "127.0.0.1", 0)
        port, _ = await _front(pki, up.sockets[0].getsockname()[1])
        async with _client(port, pki) as ws:
            await ws.send("go")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        end = await asyncio.wait_for(upstream.ended, 5)
        up.close()
        return (closed.value.rcvd.code, closed.value.rcvd.reason), end, upstream.data
    received, end, data = run(body())
    assert received == (1000, "bye") and end == "close_notify"
    first, answer = data[:8], data[8:]                  # "go", masked; the client's close
    body = bytes(b ^ answer[2 + (i & 3)] for i, b in enumerate(answer[6:]))
    assert (first[:1], answer[:2], body) == (b"\x81", b"\x88\x85", b"\x03\xe8bye")


def test_a_legs_sslobject_is_the_relays_after_the_handover(pki):
    """Python code holding a leg's SSLObject can neither take records the relay
    is owed nor get bytes onto a socket (they would land among the relay's records)."""
    async def body():
        async with _tls_upstream(_echo, pki) as up:
            port, relays = await _front(pki, up.sockets[0].getsockname()[1])
            async with _client(port, pki) as ws:
                await ws.send(b"before")
                assert await ws.recv() == b"before"
                _, client_tls, upstream_tls = await relays
                payload = os.urandom(100_000)
                await ws.send(payload)
                await asyncio.sleep(0.1)        # the echo's records are read by the relay
                for sslobj in (client_tls, upstream_tls):
                    with pytest.raises(ssl.SSLWantReadError):
                        sslobj.read(1 << 20)
                assert await ws.recv() == payload
                with pytest.raises(ssl.SSLError):
                    upstream_tls.write(b"\x82\x04junk")
    run(body())


def test_a_notice_larger_than_the_send_buffer_reaches_a_tls_client(pki):
    """The notice's records take several rounds of the relay's send buffer."""
    notice = b"n" * 400_000

    async def body():
        async with _tls_upstream(_echo, pki) as up:
            port, relays = await _front(pki, up.sockets[0].getsockname()[1])
            async with _client(port, pki) as ws:
                await ws.send("hello")
                assert await ws.recv() == "hello"
                relay, _, _ = await relays
                relay.close(1001, "going away", 1001, "going away", notice)
                message = await asyncio.wait_for(ws.recv(), 5)
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
                return message, closed.value.rcvd.code
    assert run(body()) == (notice.decode(), 1001)


def test_a_tls_session_copy_resumes_and_outlives_its_legs(pki):
    """`_relay.TLSSession` (the provider legs' resumption): copied from a finished
    handshake with its tickets, offered to the next, released in any order with the
    SSL objects that used it, and still resumable after they were freed without
    close_notify (which marks an SSL's own session not resumable). scripts/asan.sh
    runs this on the sanitized build."""
    server_ctx, client_ctx = pki

    def handshake(session=None):
        ci, co, si, so = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(ci, co, server_hostname="127.0.0.1")
        if session is not None:
            assert _relay.tls_resume(client, session)
        server = server_ctx.wrap_bio(si, so, server_side=True)
        for _ in range(4):  # ClientHello; the server's flight; Finished; the tickets
            for side in (client, server):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            si.write(co.read())
            ci.write(so.read())
        with pytest.raises(ssl.SSLWantReadError):
            client.read()  # takes the tickets; no data
        return client

    fresh = client_ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.1")
    assert _relay.tls_session(fresh) is None  # no handshake yet
    first = handshake()
    session = _relay.tls_session(first)
    assert session is not None and not first.session_reused
    del first
    second = handshake(session)
    del session  # the SSL holds its own reference
    assert second.session_reused
    newest = _relay.tls_session(second)
    del second
    assert newest is not None and handshake(newest).session_reused


def _hello_without_key_shares(client_ctx) -> bytes:
    """A TLS 1.3 ClientHello record that offers no key share: the server answers with
    a HelloRetryRequest, and the client's next ClientHello is read as the first was."""
    sslobj = client_ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                 server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        sslobj.do_handshake()
    hello = outgoing.read()[9:]                 # past the record and message headers
    at = 34 + 1 + hello[34]                     # version, random, session id
    at += 2 + int.from_bytes(hello[at:at + 2], "big") + 1
    at += hello[at - 1]                         # cipher suites, compression methods
    head, extensions, rest = hello[:at], b"", hello[at + 2:]
    while rest:
        kind, size = rest[:2], int.from_bytes(rest[2:4], "big")
        data, rest = rest[4:4 + size], rest[4 + size:]
        if kind == b"\x00\x33":                 # key_share: an empty list
            data = b"\x00\x00"
        extensions += kind + len(data).to_bytes(2, "big") + data
    body = head + len(extensions).to_bytes(2, "big") + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


@pytest.mark.parametrize("declared", [128 << 10, tlsleg._HELLO_MAX + 1], ids=["128 KiB", "a byte over"])
@pytest.mark.parametrize("which", ["first", "after a retry", "after a retry and an alert"])
def test_a_clienthello_too_large_is_refused_at_its_header(pki, which, declared):
    """OpenSSL makes room for a ClientHello as large as its header says (up to 128 KiB,
    zero-filled) before any of it came: 9 bytes held 123 KiB of the listener per
    connection until its handshake timeout. A server stream drops a connection whose
    ClientHello (the first, or the one after a HelloRetryRequest) is larger than the
    16 KiB OpenSSL sets up anyway, and says why as a failed handshake. A warning alert
    before the second (user_canceled, which TLS 1.3 lets pass) ended the check."""
    big = b"\x16\x03\x01\x00\x04\x01" + declared.to_bytes(3, "big")

    async def body():
        loop = asyncio.get_running_loop()
        lost = loop.create_future()

        class App(asyncio.Protocol):
            def connection_lost(self, exc):
                lost.set_result(exc)

        server = await loop.create_server(lambda: tlsleg.TLSStream(pki[0], App(), server_side=True),
                                          "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        if which != "first":
            writer.write(_hello_without_key_shares(pki[1]))
            retry = await reader.readexactly(5)
            await reader.readexactly(int.from_bytes(retry[3:5], "big"))
            writer.write(b"\x14\x03\x03\x00\x01\x01")   # change_cipher_spec, as clients send
            if which == "after a retry and an alert":
                writer.write(b"\x15\x03\x03\x00\x02\x01\x5a")    # warning: user_canceled
        writer.write(big)
        exc = await asyncio.wait_for(lost, 5)
        writer.close()
        server.close()
        return retry[0] if which != "first" else 22, getattr(exc, "reason", exc)
    assert run(body()) == (22, "EXCESSIVE_MESSAGE_SIZE")


def test_handshakes_with_a_retry_or_a_tls12_resumption_pass_the_hello_check():
    """What a server stream reads ahead of OpenSSL for ClientHellos lets real ones
    through: a second ClientHello after a HelloRetryRequest (the server takes only
    P-256, the client's first key share is X25519), and TLS 1.2 resumptions, whose
    change_cipher_spec is followed by an encrypted Finished (read as a ClientHello
    header, 1 in 256 would look like one, most of them too large)."""
    async def body(server_ctx, client_ctx, resume):
        loop = asyncio.get_running_loop()

        class Echo(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                self.transport.write(data)

        server = await loop.create_server(lambda: tlsleg.TLSStream(server_ctx, Echo(), server_side=True),
                                          "127.0.0.1", 0)
        session, reused = None, []
        for _ in range(40 if resume else 1):
            raw, client = await loop.create_connection(_Collect, "127.0.0.1", server.sockets[0].getsockname()[1])
            stream = await tlsleg.start_tls(raw, client, client_ctx, "127.0.0.1", session)
            stream.write(b"ping")
            await asyncio.wait_for(_until(lambda: client.data == b"ping"), 5)
            reused.append(stream.sslobj.session_reused)
            session = _relay.tls_session(stream.sslobj) if resume else None
            stream.close()
        server.close()
        return reused

    with tempfile.TemporaryDirectory() as d:
        ca = CA()
        client_ctx = ssl.create_default_context(cafile=ca.write(os.path.join(d, "ca.pem")))
        retrying, server_ctx = ca.server_context(d), ca.server_context(d)
        retrying.set_ecdh_curve("prime256v1")
        assert run(body(retrying, client_ctx, False)) == [False]
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        assert run(body(server_ctx, client_ctx, True)) == [False] + [True] * 39
