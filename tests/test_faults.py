"""Faults: resets mid-frame, a half-closed upstream, an upstream that stops reading.
Each ends both sides cleanly, and the session's end says what happened."""

import asyncio
import contextlib
import itertools
import json
import re
import socket
import struct
import sys
import time

import pytest
from conftest import (PROVIDER_SECRET, Keys, MockProcess, SidecarProcess, SlowUpstream, held_port,
                      http_get, raw_upstream_sidecar, run, self_signed_tls, standard_keys, switching_protocols)
from test_bad_input import close_frame_of, masked, request, session, session_ends
from test_governance import metric
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage


class RawUpstream(asyncio.Protocol):
    """Answers the upgrade, then runs `act(transport)`; records when it is closed."""

    def __init__(self, act, events):
        self.act, self.events, self.head = act, events, b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.head is None:
            self.events.setdefault("data", bytearray()).extend(data)
            if "on_data" in self.events:
                self.events["on_data"](self.transport, self.events["data"])
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.transport.write(switching_protocols(self.head))
            self.head = None
            self.act(self.transport)

    def eof_received(self):
        self.events["eof"] = time.monotonic()
        return self.events.get("keep_open")     # True: the provider's side stays open after ours

    def connection_lost(self, exc):
        self.events["lost"] = time.monotonic()


def _watched(proc):
    """A module's sidecar, which must still run at the end with no traceback."""
    try:
        yield proc
        assert proc.proc.poll() is None and "Traceback" not in proc.output()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    yield from _watched(raw_upstream_sidecar(str(tmp_path_factory.mktemp("faults")),
                                             "close_timeout_seconds = 1"))


@pytest.fixture(scope="module")
def lagging(tmp_path_factory):
    """`faulty` with a close timeout of 10 s, for which a reset provider's tail that
    its lagging client has not read is kept: a client held up on a loaded machine can
    take more than faulty's 1 s to read it once it stops lagging."""
    yield from _watched(raw_upstream_sidecar(str(tmp_path_factory.mktemp("lagging")),
                                             "close_timeout_seconds = 10"))


def reset(transport):
    """Close with SO_LINGER 0: the peer gets a TCP RST."""
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def last_end(sidecar, events) -> dict:
    """The session_end line of the session with_upstream ran, found by its model: an
    earlier test's session (one that did not wait for its end) may be logged later."""
    deadline = time.monotonic() + 5
    while not (ends := [e for e in session_ends(sidecar) if e.get("model") == events["model"]]):
        assert time.monotonic() < deadline, "no session_end for this session"
        time.sleep(0.05)
    (end,) = ends
    return end


_sessions = itertools.count()


def with_upstream(sidecar, act, client, rcvbuf: int | None = None):
    """Run `client` in a session whose provider is a RawUpstream running `act`; with
    `rcvbuf`, the provider's sockets take at most that much unread."""
    async def body():
        events = {"model": f"m-{next(_sessions)}"}      # names its session_end line
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        listener.bind(("127.0.0.1", sidecar.upstream_port))
        async with await loop.create_server(lambda: RawUpstream(act, events), sock=listener):
            reader, writer = await session(sidecar.port, sidecar.keys.plain["good"],
                                           f"/v1/realtime/connect?provider=raw&model={events['model']}")
            result = await client(reader, writer, events)
            writer.close()
            return result, events
    return run(body())


def test_upstream_reset_mid_frame(faulty):
    def act(transport):
        transport.write(bytes([0x82, 126, 0x10, 0x00]) + b"half a frame")   # 4096 announced
        asyncio.get_running_loop().call_later(0.1, reset, transport)

    async def client(reader, writer, events):
        data = await asyncio.wait_for(reader.read(), 5)      # the sidecar closes the socket
        return data
    data, events = with_upstream(faulty, act, client)
    # Mid-frame no close frame can follow: the client's connection is dropped.
    assert data.startswith(bytes([0x82, 126, 0x10, 0x00]))
    end = last_end(faulty, events)
    assert (end["closed_by"], end["close_code"]) == ("upstream", 1006)


def test_upstream_reset_between_frames_gives_1014(faulty):
    def act(transport):
        transport.write(bytes([0x82, 2]) + b"ok")
        asyncio.get_running_loop().call_later(0.1, reset, transport)

    async def client(reader, writer, events):
        assert await reader.readexactly(4) == bytes([0x82, 2]) + b"ok"
        return await close_frame_of(reader)
    result, _ = with_upstream(faulty, act, client)
    assert result == (1014, "upstream connection lost")


def test_a_client_still_sending_when_the_provider_resets_reads_its_1014(faulty):
    """The provider takes nothing, so the relay stops reading the client (backpressure),
    whose frames wait unread in the sidecar's socket; then the provider resets. The
    client gets 1014 and its socket closes: closed at once with those bytes unread, the
    kernel answered them with a reset, and the client's read failed
    (`ConnectionResetError`) with the close frame in its buffer. It closes lingering
    now, as a violator's does: the client reads its 1014, then the end."""
    provider = []

    def act(transport):
        transport.pause_reading()                           # takes nothing
        provider.append(transport)

    async def client(reader, writer, events):
        writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        chunk = masked(0x82, bytes(60000)) * 32            # 2 MB
        while not writer.transport.get_write_buffer_size():  # until the path is full: the
            writer.write(chunk)                             # sidecar holds bytes unread
            await asyncio.sleep(0.05)
        reset(provider[0])
        code = await close_frame_of(reader)
        assert await asyncio.wait_for(reader.read(), 5) == b""     # no reset
        return code
    result, _ = with_upstream(faulty, act, client, rcvbuf=4096)
    assert result == (1014, "upstream connection lost")


_SENT = {
    "a whole message": bytes([0x81, 5]) + b"hello",
    "half a frame": bytes([0x82, 126, 0x10, 0x00]) + b"hello",     # 4096 announced
    "half a header": bytes([0x81, 5]) + b"hello" + bytes([0x82]),  # (the relay holds the 0x82)
    "a message's first fragment": bytes([0x01, 5]) + b"hello",
}


@pytest.mark.parametrize("sent", list(_SENT))
def test_a_provider_whose_client_left_lingers_only_while_it_may_still_send(faulty, sent):
    """The client drops its connection; the provider gets the sidecar's close and end
    and keeps its side open. One quiet between messages (nothing unread, nothing half
    sent) is closed at once: a lingering close costs a protocol, a timer and a loop turn
    per session. One in the middle of a frame or message will send the rest: it lingers."""
    def act(transport):
        transport.write(_SENT[sent])

    async def client(reader, writer, events):
        events["keep_open"] = True
        await reader.readexactly(9 if sent == "half a frame" else 7)
        reset(writer.transport)
        # The gauge, read from the reset until 0.2 s after the sidecar's end: a lingering
        # close lasts 1 s at most, and one reading after the end could come too late on
        # a loaded machine (CI once read 0). The most it read is the answer.
        seen, deadline = 0.0, time.monotonic() + 5
        while time.monotonic() < deadline and time.monotonic() - events.get("eof", 1e18) < 0.2:
            seen = max(seen, await asyncio.to_thread(metric, faulty, "conduit_connections_lingering"))
        return seen
    lingering, events = with_upstream(faulty, act, client)
    assert events["data"].startswith(bytes([0x88])) and "eof" in events    # our close, then our end
    assert lingering == (0 if sent == "a whole message" else 1)


def test_upstream_half_close_gives_1014(faulty):
    def act(transport):
        transport.write(bytes([0x81, 5]) + b"hello")
        transport.write_eof()                                # FIN without a close frame

    async def client(reader, writer, events):
        assert await reader.readexactly(7) == bytes([0x81, 5]) + b"hello"
        result = await close_frame_of(reader)
        for _ in range(40):                 # and the sidecar closes the upstream socket
            if "lost" in events:
                break
            await asyncio.sleep(0.05)
        return result
    result, events = with_upstream(faulty, act, client)
    assert result == (1014, "upstream connection lost")
    assert "lost" in events
    end = last_end(faulty, events)
    assert (end["closed_by"], end["close_code"]) == ("upstream", 1006)


def test_client_reset_mid_frame(faulty):
    async def client(reader, writer, events):
        writer.write(masked(0x82, b"x" * 100)[:50])          # half a frame, then a reset
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        reset(writer.transport)
        for _ in range(200):
            if "lost" in events:
                return events["lost"] - t0
            await asyncio.sleep(0.05)
        return None
    elapsed, events = with_upstream(faulty, lambda t: None, client)
    assert elapsed is not None                # the sidecar let go of the upstream (within 10 s)
    end = last_end(faulty, events)
    assert (end["closed_by"], end["close_code"]) == ("client", 1006)


def test_upstream_that_stops_reading(faulty):
    """The client keeps sending to a provider that reads nothing: the sidecar stops
    reading the client (its memory stays flat); when the provider finally vanishes,
    the client is closed."""
    held = []

    def act(transport):
        transport.pause_reading()
        held.append(transport)
        asyncio.get_running_loop().call_later(1.5, transport.abort)

    async def client(reader, writer, events):
        frame = masked(0x82, b"z" * 60000)
        sent = 0
        try:
            while sent < 64 << 20:
                writer.write(frame)
                await asyncio.wait_for(writer.drain(), 3)
                sent += len(frame)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        try:    # a close frame then EOF, or a reset: this client sends on without reading,
            data = await asyncio.wait_for(reader.read(), 10)    # past what a lingering close reads
        except ConnectionError:
            data = None
        return sent, data
    (sent, data), events = with_upstream(faulty, act, client)
    assert sent < 64 << 20              # the client was held back, not buffered without bound
    end = last_end(faulty, events)
    assert end["closed_by"] == "upstream" and end["close_code"] == 1006


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_a_peer_that_ends_its_side_and_reads_no_more_is_let_go_at_the_close_timeout(faulty, side):
    """A peer ends its side of the TCP connection without a close frame (leaving) while
    it reads nothing of the 16 MiB the other peer sends it. The sidecar closed its
    socket once what the transport held was sent, which a peer that reads no more
    never takes: the socket stayed in CLOSE-WAIT and the session live (the other peer's
    connection open) for as long as that peer's kernel kept its window shut. It is
    dropped at close_timeout_seconds (1 s here) now, and the other peer let go."""
    flood = bytes([0x82, 127]) + (1 << 20).to_bytes(8, "big") + bytes(1 << 20)

    def act(transport):
        if side == "client":
            for _ in range(16):
                transport.write(flood)
        else:
            transport.pause_reading()                         # reads nothing the client sends
            asyncio.get_running_loop().call_later(0.5, transport.write_eof)

    async def client(reader, writer, events):
        if side == "client":
            await asyncio.sleep(0.5)                          # the buffers fill up
            writer.write_eof()
        else:
            frame = masked(0x82, bytes(65000))
            for _ in range(256):                              # 16 MiB
                writer.write(frame)
        for _ in range(100):   # (a provider that reads nothing cannot see its reset)
            ended = any(e.get("model") == events["model"] for e in session_ends(faulty))
            if ended and (side == "upstream" or "lost" in events):
                return True
            await asyncio.sleep(0.05)
        return False
    let_go, events = with_upstream(faulty, act, client)
    assert let_go, "the session is still live 5 s later"
    end = last_end(faulty, events)
    assert end["closed_by"] == side and end["close_code"] == 1006, end


@pytest.mark.parametrize("side, then", [("client", None), ("upstream", None), ("client", "upstream")],
                         ids=["client", "upstream", "client-then-upstream"])
def test_a_held_back_peer_that_resets_ends_its_session(faulty, side, then):
    """A peer floods the other, which takes nothing (neither reads nor writes): the
    sidecar stops reading the flooding peer, which then resets. uvloop polls a paused
    socket for nothing, so the reset was seen only once the other peer read or wrote:
    the session, its slots and the other connection stayed for as long as that peer
    stayed quiet. The poll (keys_poll_seconds, 0.2 s here) asks each paused socket.
    `then`: the other peer resets too, once the poll has seen the first one's reset
    (its unread bytes kept for the close timeout, 1 s here): the session is still the
    first one's. The relay named the peer whose connection_lost came first, and a loss
    seen meanwhile took the end from the peer the poll had seen leave."""
    flood = bytes([0x82, 127]) + (1 << 20).to_bytes(8, "big") + bytes(1 << 20)
    upstream = []

    def act(transport):
        upstream.append(transport)
        transport.pause_reading()                             # takes nothing...
        if side == "upstream":
            for _ in range(16):
                transport.write(flood)                        # ... or floods the client
            asyncio.get_running_loop().call_later(1.0, reset, transport)

    async def client(reader, writer, events):
        if side == "client":
            frame = masked(0x82, bytes(65000))
            for _ in range(256):                              # 16 MiB
                writer.write(frame)
            await asyncio.sleep(1.0)                          # the buffers fill up
            reset(writer.transport)
        if then == "upstream":
            await asyncio.sleep(0.5)                          # the poll sees the reset
            reset(upstream[0])
        for _ in range(100):
            if any(e.get("model") == events["model"] for e in session_ends(faulty)):
                return True
            await asyncio.sleep(0.05)
        return False
    let_go, events = with_upstream(faulty, act, client)
    assert let_go, "the session is still live 5 s after the reset"
    end = last_end(faulty, events)
    assert end["closed_by"] == side and end["close_code"] == 1006, end


def tcp_queue(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """The TCP state and receive queue of the loopback socket local_port -> remote_port
    (/proc/net/tcp), or None once it is gone."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.split(":")[1], 16), int(remote.split(":")[1], 16)) == (local_port, remote_port):
                return int(fields[3], 16), int(fields[4].split(":")[1], 16)
    return None


def loop_waits(pid: int) -> int:
    """How often the process's (main) thread has waited: the sidecar's event loop, in
    its wait for events. A loaded machine stops it too, but not by its own wait."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches:"))


@pytest.mark.skipif(sys.platform != "linux", reason="the poll asks TCP_INFO, Linux's")
@pytest.mark.parametrize("end", ["fin", "reset", "reset-client-sends"])
def test_a_providers_last_messages_and_close_reach_a_client_that_lags(lagging, end):
    """The provider sends its last messages, its close and ends its side (FIN), or
    resets (RST), as a provider that is done may, while the client lags behind (reads
    nothing): the sidecar's reading from the provider is paused with the tail, close
    frame included, unread in its socket, which the FIN puts in CLOSE_WAIT and the reset
    in CLOSE (Linux keeps what a reset socket holds readable). The poll's check of
    paused legs (Relay.drop_left) took that for a provider gone without a close and
    dropped the leg: the client lost the tail and the provider's close (1014). A client
    still sending (audio) lost it too: the failed send to the reset socket dropped it."""
    frame = bytes([0x82, 127]) + (1 << 16).to_bytes(8, "big") + bytes(1 << 16)
    close_wait = 8

    async def tail(transport, events):
        sock = transport.get_extra_info("socket")
        mine, theirs = sock.getsockname()[1], sock.getpeername()[1]
        events["sent"] = 0
        while True:     # until the sidecar reads no more: its receive queue stays while its
            transport.write(frame)      # loop waits for events twice (a sidecar held up on a
            events["sent"] += 1         # loaded machine reads none either, but waits for none)
            await asyncio.sleep(0.005)
            unread, waits = tcp_queue(theirs, mine)[1], loop_waits(lagging.pid)
            while unread and tcp_queue(theirs, mine)[1] == unread and loop_waits(lagging.pid) < waits + 2:
                await asyncio.sleep(0.02)
            if unread and tcp_queue(theirs, mine)[1] == unread:
                break
        assert transport.get_write_buffer_size() == 0       # all of it in the sidecar's queue
        close = bytes([0x88, 6]) + (1000).to_bytes(2, "big") + b"done"
        transport.write(close)
        if end == "fin":
            transport.write_eof()
        else:   # once the close is in the sidecar's queue too: a reset drops what is unsent
            for _ in range(100):
                if tcp_queue(theirs, mine)[1] == unread + len(close):
                    break
                await asyncio.sleep(0.01)
            reset(transport)
        for _ in range(100):
            if (state := tcp_queue(theirs, mine)) is None or state[0] == close_wait:
                break
            await asyncio.sleep(0.01)
        events["paused"] = state

    upstream = []

    async def client(reader, writer, events):
        await tail(upstream[0], events)
        state = events["paused"]
        # the sidecar's socket: gone (reset, or dropped already) or in CLOSE_WAIT, the close unread
        assert state is None or (state[0] == close_wait and state[1] > 0), state
        if end == "reset-client-sends":
            mine = writer.get_extra_info("sockname")[1]
            for _ in range(3):      # for the provider, which is gone; each read on its own
                writer.write(masked(0x82, b"audio"))
                for _ in range(250):    # (a sidecar held up would read them together)
                    if tcp_queue(lagging.port, mine)[1] == 0:
                        break
                    await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)    # the poll (0.2 s) runs meanwhile; a reset waits 10 s (close timeout)
        frames: list[int] = []
        code, reason = await close_frame_of(reader, frames)
        return events["sent"], len(frames), code, reason
    (sent, got, code, reason), events = with_upstream(lagging, upstream.append, client)
    assert (got, code, reason) == (sent, 1000, "done")
    # What went to the reset provider is dropped, not relayed: neither counted nor charged
    # (as audio), but for the frame whose send found the reset, if the poll had not.
    end = last_end(lagging, events)
    assert end["frames_client_to_upstream"] <= 1 and end["bytes_client_to_upstream"] <= 11, end


def test_a_tls_client_that_sends_close_notify_and_reads_no_more_is_let_go_at_the_close_timeout(tmp_path):
    """The wss listener's client sends its TLS close_notify (no close frame, its TCP
    connection kept open) and reads nothing of the 16 MiB the provider sends. The relay
    shut the leg (a close_notify is a plain leg's end of file), and the transport's close
    waited for the peer to take what it held: the session stayed live, the provider's
    connection open, for as long as the client's socket stayed. It is dropped at
    close_timeout_seconds (1 s here) now."""
    import ssl
    tls_port, upstream_port = held_port(), held_port()
    sidecar = SidecarProcess(
        str(tmp_path), f'[providers.raw]\nurl = "ws://127.0.0.1:{upstream_port}/"\n', standard_keys(),
        limits="close_timeout_seconds = 1\n",
        extra=self_signed_tls(tls_port, tmp_path / "public" / "ca.pem", tmp_path / "private")).start()
    flood = bytes([0x82, 127]) + (1 << 20).to_bytes(8, "big") + bytes(1 << 20)

    def client() -> socket.socket:
        """Upgrade over TLS (an SSLObject on a socket with a small receive buffer),
        then send close_notify and read no more."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", tls_port))
        context = ssl.create_default_context(cafile=str(tmp_path / "public" / "ca.pem"))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(request("/v1/realtime/connect?provider=raw&model=m-notify", key=sidecar.keys.plain["good"]))
        sock.sendall(outgoing.read())
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                head += tls.read(65536)
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(4096))
        assert head.startswith(b"HTTP/1.1 101"), head
        with pytest.raises(ssl.SSLWantReadError):     # its close_notify is out; ours never read
            tls.unwrap()
        sock.sendall(outgoing.read())
        return sock

    async def body():
        events = {"model": "m-notify"}                   # names its session_end line
        loop = asyncio.get_running_loop()
        async with await loop.create_server(
                lambda: RawUpstream(lambda t: [t.write(flood) for _ in range(16)], events),
                "127.0.0.1", upstream_port):
            sock = await asyncio.to_thread(client)
            for _ in range(100):
                if "lost" in events:
                    break
                await asyncio.sleep(0.05)
            let_go = "lost" in events
            sock.close()
            return let_go, events
    try:
        let_go, events = run(body())
        assert let_go, "the provider's connection is still open 5 s later"
        end = last_end(sidecar, events)
    finally:
        sidecar.stop()
    assert end["closed_by"] == "client" and end["close_code"] == 1006, end


def test_a_client_that_ends_its_side_after_its_close_still_gets_the_providers_answer(faulty):
    """The client sends its close, then ends its side of the TCP connection (shutdown
    SHUT_WR): a half-close, its socket still open for reading. The provider finishes
    what it had to say and answers the close a moment later: the client gets both. The
    relay took the client's end for a lost connection and closed its socket at once, so
    the client never got the answer to its close (1006 where the provider said 1000)."""
    def answer(transport, data):
        if data[:1] == b"\x88" and not transport.is_closing():
            last = bytes([0x81, 4]) + b"last" + b"\x88\x05\x03\xe8bye"
            asyncio.get_running_loop().call_later(0.2, transport.write, last)

    async def client(reader, writer, events):
        events["on_data"] = answer
        writer.write(masked(0x88, (1000).to_bytes(2, "big")))
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)     # until the sidecar closes
    data, events = with_upstream(faulty, lambda t: None, client)
    assert data == bytes([0x81, 4]) + b"last" + b"\x88\x05\x03\xe8bye"
    end = last_end(faulty, events)
    assert (end["closed_by"], end["close_code"]) == ("client", 1000)


def test_a_provider_that_ends_its_side_after_its_close_still_gets_the_clients_answer(faulty):
    """The same from the provider: its close, then its end of the TCP connection. The
    client's answer to that close reaches it (the relay had closed the client's socket
    as soon as the provider's end came, before the client could answer)."""
    def act(transport):
        transport.write(b"\x88\x05\x03\xe8bye")
        transport.write_eof()

    async def client(reader, writer, events):
        await answer_the_close(reader, writer, events, "bye")
    _, events = with_upstream(faulty, act, client)
    data = events.get("data", b"")
    assert data[:1] == b"\x88" and len(data) == 2 + 4 + 4
    body = bytes(b ^ data[2 + (i & 3)] for i, b in enumerate(data[6:]))
    assert body == (1000).to_bytes(2, "big") + b"ok"


async def answer_the_close(reader, writer, events, reason: str) -> None:
    """A client of with_upstream: reads the provider's close (1000, `reason`), answers
    it with 1000 "ok", then waits for the sidecar to close and let go of the provider."""
    assert await close_frame_of(reader) == (1000, reason)
    writer.write(masked(0x88, (1000).to_bytes(2, "big") + b"ok"))
    await asyncio.wait_for(reader.read(), 5)                # the sidecar closes
    for _ in range(100):                                    # and lets go of the provider
        if "lost" in events:
            break
        await asyncio.sleep(0.05)


def test_a_close_the_provider_never_answers_is_answered_at_the_close_timeout(faulty):
    """The client closes; the provider reads the close and never answers. At the close
    timeout the client gets a close that says why, then its socket closes. The answer
    to the client's own close is a normal closure: with 1014 the documented resilient
    client reconnects after its disconnect()."""
    async def client(reader, writer, events):
        writer.write(masked(0x88, b""))                     # disconnect(): no code
        return await asyncio.wait_for(reader.read(), 5)     # until the sidecar closes
    data, events = with_upstream(faulty, lambda t: None, client)
    reason = b"upstream did not answer the close"
    assert data == bytes([0x88, 2 + len(reason)]) + (1000).to_bytes(2, "big") + reason
    end = last_end(faulty, events)
    assert (end["closed_by"], end["close_code"]) == ("client", 1005)


@pytest.mark.parametrize("answer", ["codeless close", "connection lost", "masked frame"])
def test_the_answer_to_a_clients_codeless_close_is_a_normal_closure(faulty, answer):
    """disconnect() in the docs' classes closes without a code, and providers echo a
    codeless close (RFC 6455 5.5.1). The client reads the answer's code: 1005 (or 1014
    when the provider drops the connection instead) made the documented resilient
    client reconnect, undoing the disconnect. It gets 1000, also when the provider
    breaks the protocol instead (1014 otherwise); a close with a code, or an answer
    with one, passes unchanged (other tests)."""
    def on_data(transport, data):
        if data[:1] == b"\x88":                           # the client's close, relayed
            if answer == "codeless close":
                transport.write(b"\x88\x00")
            elif answer == "masked frame":                  # a violation, in place of an answer
                transport.write(bytes([0x82, 0x81, 1, 2, 3, 4, ord("x") ^ 1]))
            else:
                transport.close()

    async def client(reader, writer, events):
        events["on_data"] = on_data
        writer.write(masked(0x88, b""))
        return await asyncio.wait_for(reader.read(), 5)
    data, _ = with_upstream(faulty, lambda t: None, client)
    reason = {"codeless close": b"", "connection lost": b"upstream connection lost",
              "masked frame": b"upstream: masked frame from the upstream"}[answer]
    assert data == bytes([0x88, 2 + len(reason)]) + (1000).to_bytes(2, "big") + reason


def test_a_close_the_client_never_answers_is_answered_at_the_close_timeout(faulty):
    """The same the other way: the provider's close gets 1001 at the close timeout."""
    def act(transport):
        transport.write(b"\x88\x05\x03\xe8bye")

    async def client(reader, writer, events):
        assert await close_frame_of(reader) == (1000, "bye")      # and never answered
        await asyncio.wait_for(reader.read(), 5)                # until the sidecar closes
        for _ in range(100):
            if "lost" in events:
                break
            await asyncio.sleep(0.05)
    _, events = with_upstream(faulty, act, client)
    data = events["data"]
    body = bytes(b ^ data[2 + (i & 3)] for i, b in enumerate(data[6:]))
    assert data[0] == 0x88 and body == (1001).to_bytes(2, "big") + b"client did not answer the close"


@pytest.mark.parametrize("answers", [True, False])
def test_a_violating_client_gets_its_close_code_whether_or_not_the_provider_answers(faulty, answers):
    """The provider is closed first (1002, reason naming the client); the client gets
    its 1002 once the provider answers, or at the close timeout if it never does."""
    def answer(transport, data):
        if answers and data[:1] == b"\x88" and not transport.is_closing():
            transport.write(b"\x88\x02\x03\xea")           # the provider answers 1002
            transport.close()

    async def client(reader, writer, events):
        events["on_data"] = answer
        writer.write(bytes([0x82, 3]) + b"abc")              # unmasked: a violation
        return await close_frame_of(reader)
    result, events = with_upstream(faulty, lambda t: None, client)
    assert result == (1002, "client: unmasked frame from the client")
    data = events["data"]
    n = data[1] & 0x7F
    body = bytes(b ^ data[2 + (i & 3)] for i, b in enumerate(data[6:6 + n]))
    assert (int.from_bytes(body[:2], "big"), body[2:].decode()) == (
        1002, "client: unmasked frame from the client")


def test_the_providers_answer_to_a_violators_last_message_comes_before_its_close(faulty):
    """The client's last good message, then a violation; the provider answers that
    message and closes in one write, before the sidecar's close reached it: the client
    gets the answer, then its 1002. The provider's close was handled before the bytes
    ahead of it in the same read were sent, and the answer was lost."""
    def answer(transport, data):
        if data[:1] == b"\x81" and not transport.is_closing():    # the last good message
            transport.write(bytes([0x81, 6]) + b"answer" + b"\x88\x02\x03\xe8")
            transport.close()

    async def client(reader, writer, events):
        events["on_data"] = answer
        writer.write(masked(0x81, b"last good") + masked(0x83, b"bad"))   # opcode 3: reserved
        return await asyncio.wait_for(reader.read(), 5)     # until the sidecar closes
    data, events = with_upstream(faulty, lambda t: None, client)
    assert data[:8] == bytes([0x81, 6]) + b"answer"
    code = struct.unpack(">H", data[10:12])[0]
    assert data[8] == 0x88 and (code, data[12:]) == (1002, b"client: reserved opcode 3")


# Run in the sidecar process before `serve`: `decide` (before the 101) and `meter`
# (after it, the upstream connected) each raise once, as a bug of ours would.
_INJECT = """
import sys
import conduit_sidecar.session as session

def once(owner, name, quoting):
    # The message quotes what a library's message could: the request's key.
    real, left = getattr(owner, name), [1]
    def faulty(*args, **kwargs):
        if left[0]:
            left[0] = 0
            raise RuntimeError(f"injected fault near {quoting(args)!r}")
        return real(*args, **kwargs)
    setattr(owner, name, faulty)

once(session, "decide", lambda args: args[0].headers["Authorization"])
once(session, "meter", lambda args: args[0])
once(session.ClientHandshake, "data_received", lambda args: args[1])  # a callback of the loop
once(session.tlsleg, "handover", lambda args: args[0])  # after the relay is made, before it runs
from conduit_sidecar.cli import main
sys.exit(main())
"""


def test_a_bug_of_ours_ends_the_session_with_500_or_1011_and_frees_what_it_held(tmp_path, mock_provider):
    """An exception nothing expects while a session opens: 500 before the 101, 1011
    after it (the upstream dropped, the key's slot freed), a log line with the
    traceback but not the exception's message, which could quote a key; never a
    client left waiting on a socket nobody reads. One in a callback of the event loop
    is logged the same way, not by asyncio's handler."""
    keys = Keys()
    keys.add("one", max_connections=1)
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), keys)
    sidecar.argv = [sys.executable, "-c", _INJECT, *sidecar.argv[3:]]  # in place of -m conduit_sidecar
    sidecar.start()
    auth = {"Authorization": f"Bearer {keys.plain['one']}"}

    async def body():
        with pytest.raises((InvalidMessage, ConnectionClosed, OSError)):  # the loop's handler aborts it
            async with connect(sidecar.url(), additional_headers=auth, open_timeout=5):
                pass
        # The 500 and the first 1011 to clients that send a megabyte past their request
        # before they read: closed at once, the sidecar answered those bytes with a
        # reset, and the client's read failed; they linger now, as refusals do.
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(request(key=keys.plain["one"]) + bytes(1 << 20))
        refused = await asyncio.wait_for(reader.read(), 5)              # no reset
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(request(key=keys.plain["one"]) + bytes(1 << 20))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        assert await close_frame_of(reader) == (1011, "internal error")
        assert await asyncio.wait_for(reader.read(), 5) == b""          # no reset
        writer.close()
        async with connect(sidecar.url(), additional_headers=auth, open_timeout=5) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, "internal error")
        async with connect(sidecar.url(), additional_headers=auth, open_timeout=5) as ws:
            assert "session.created" in await ws.recv()  # the slot of max_connections = 1 is free
            await ws.send(b"\x01" * 960)
            assert await ws.recv() == b"\x01" * 960
        return refused, closed.value.rcvd
    try:
        refused, close = run(body())
        assert refused.startswith(b"HTTP/1.1 500 ") and refused.endswith(b"internal error\n")
        assert (close.code, close.reason) == (1011, "internal error")
        bugs = sidecar.wait_lines(lambda line: line.get("event") == "internal_error", 3)
        assert len(bugs) == 3
        assert all("builtins.RuntimeError (message not logged)" in b["error"] for b in bugs)
        assert [b["error"].count("File ") > 2 for b in bugs] == [True] * 3  # the frames are there
        loop_errors = sidecar.wait_lines(lambda line: line.get("event") == "loop_error")
        assert len(loop_errors) == 1 and "in faulty" in loop_errors[0]["error"]
        output = sidecar.output()
        # The message, not the line that raises it: since Python 3.13 a traceback
        # quotes the source of `-c` code too.
        assert not re.search(r"injected fault near [^{]", output) and keys.plain["one"] not in output
        _, text = http_get(f"http://127.0.0.1:{sidecar.admin_port}/metrics")
        # One outcome per handshake: the session whose bug came after its relay was made
        # is not also counted accepted.
        assert 'conduit_connections_total{result="internal_error"} 3.0' in text
        assert 'conduit_connections_total{result="accepted"} 1.0' in text
        # The two 1011s are sidecar closes after the upgrade, as its refusals are.
        assert 'conduit_closes_total{code="1011",side="sidecar"} 2.0' in text
        assert sidecar.proc.poll() is None
    finally:
        sidecar.stop()


def _one_slot_sidecar(tmp_path, providers: str) -> tuple[Keys, SidecarProcess]:
    """A started sidecar with `providers` and one key, `one`, of one connection."""
    keys = Keys()
    keys.add("one", max_connections=1)
    return keys, SidecarProcess(str(tmp_path), providers, keys).start()


@pytest.mark.parametrize("leave", ["end", "reset"])
@pytest.mark.parametrize("path", ["plain", "held", "pipelined", "held_large"])
def test_a_client_that_leaves_while_its_session_opens_frees_the_upstream_and_its_slot(tmp_path, path, leave):
    """The client sends its request (and, on a held path, its first message), then
    ends its side or resets while the provider is slow to answer: the sidecar drops
    the upstream attempt at once, before the 101 comes, and counts the handshake
    `client_gone`. `pipelined`: a frame came with the request, before its 101; reading
    paused at once after it, so the client's end went unseen: the attempt ran until
    the provider answered (or the connect timeout), the key's slot held meanwhile, and
    the handshake counted `accepted` or `upstream_failed`. `held_large`: a first
    message of max_request_bytes or more (a long system instruction), then a frame
    as the provider is asked: that frame paused reading, as `pipelined`'s did."""
    upstream_port = held_port()
    keys, sidecar = _one_slot_sidecar(
        tmp_path,
        f'[providers.slow]\nurl = "ws://127.0.0.1:{upstream_port}/"\n'
        f'[providers.gemini]\nurl = "ws://127.0.0.1:{upstream_port}/g?key={{secret}}"\nsecret_env = "PROVIDER_KEY"\n')
    provider = "gemini" if path.startswith("held") else "slow"
    setup = {"setup": {"model": "models/gemini-live"}}
    if path == "held_large":
        setup["setup"]["systemInstruction"] = {"parts": [{"text": "x" * 16384}]}

    async def body():
        async with SlowUpstream(upstream_port, delay=4) as up:
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(request(f"/v1/realtime/connect?provider={provider}", key=keys.plain["one"])
                         + (masked(0x81, b"hello") if path == "pipelined" else b""))
            if path.startswith("held"):  # the 101 comes first, then the setup naming the model
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
                writer.write(masked(0x81, json.dumps(setup).encode()))
            await asyncio.wait_for(up.asked.wait(), 5)
            if path == "held_large":
                writer.write(masked(0x81, b'{"realtimeInput": {}}'))
            if leave == "reset":
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
            else:
                writer.write_eof()
            await asyncio.wait_for(up.released.wait(), 10)
            return up.answered
    try:
        answered = run(body())
        counts = http_get(sidecar.admin("/metrics"))[1]
        ended = sidecar.wait_lines(lambda line: line.get("event") in ("client_gone", "session_end"))
    finally:
        sidecar.stop()
    assert not answered  # let go before the provider's 101 (it comes at 4 s)
    assert 'conduit_connections_total{result="client_gone"} 1.0' in counts
    # One line says so (there was none: the session's id was skipped without a word).
    assert [(line["event"], line["session_id"], line["key_id"], line["provider"]) for line in ended] == [
        ("client_gone", "s1", "one", provider)]
    assert 'result="accepted"' not in counts
    assert "conduit_connections_active 0.0" in counts


def test_a_session_refused_at_its_held_first_message_frees_the_keys_slot(tmp_path):
    """Gemini's setup is held before the provider is asked: one refused there (here it
    names no model) is released (nothing tested that it was: without it the key's one
    slot stayed taken, and the next session got 4029 in place of its own refusal)."""
    keys, sidecar = _one_slot_sidecar(
        tmp_path, f'[providers.gemini]\nurl = "ws://127.0.0.1:{held_port()}/g?key={{secret}}"\n'
                  'secret_env = "PROVIDER_KEY"\n')

    async def refused() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(request("/v1/realtime/connect?provider=gemini", key=keys.plain["one"]))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.write(masked(0x81, b'{"setup": {}}'))
        try:
            return await close_frame_of(reader)
        finally:
            writer.close()
    try:
        refusal = (1002, "the first message must be a setup message naming the model")
        assert run(refused()) == refusal
        assert run(refused()) == refusal
    finally:
        sidecar.stop()


@pytest.mark.parametrize("answer", ["echo", "bad_101", "status", "coding"])
def test_an_upstream_answer_that_quotes_our_request_never_carries_the_secret_further(tmp_path, answer):
    """An upstream that echoes the request back (an echo service on the wrong port), or
    a 101 whose bad header repeats our request line, or a response whose status code or
    Transfer-Encoding does (websockets quotes those after a ';' or in mid-sentence, not
    after a ':'): websockets' errors quote the line, which holds the provider secret when
    the URL carries it (Gemini's `?key=`). Neither the client's close reason nor a log
    line may."""
    upstream_port = held_port()

    async def echo(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ")[1]  # the path, its ?key= included
        if answer == "echo":
            writer.write(head)
        elif answer == "status":
            writer.write(b"HTTP/1.1 " + target + b" Echo\r\nContent-Length: 0\r\n\r\n")
        elif answer == "coding":
            writer.write(b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: " + target + b"\r\n\r\n")
        else:
            line = head.split(b"\r\n", 1)[0]
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + line + b"\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
        await reader.read()
        writer.close()
    sidecar = SidecarProcess(
        str(tmp_path),
        f'[providers.echo]\nurl = "ws://127.0.0.1:{upstream_port}/?key={{secret}}"\nsecret_env = "PROVIDER_KEY"\n',
        standard_keys()).start()

    async def body():
        server = await asyncio.start_server(echo, "127.0.0.1", upstream_port)
        try:
            async with connect(sidecar.url(provider="echo"), additional_headers=sidecar.auth()) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd
        finally:
            server.close()
    try:
        rcvd = run(body())
        sidecar.wait_lines(lambda line: line.get("event") == "upstream_attempt")
        output = sidecar.output()
    finally:
        sidecar.stop()
    assert rcvd.code == 1014, rcvd
    assert PROVIDER_SECRET not in rcvd.reason and "key=" not in rcvd.reason, rcvd.reason
    assert PROVIDER_SECRET not in output and "upstream_attempt" in output


def test_a_client_that_resets_while_its_first_message_is_held_is_no_bug_of_ours(tmp_path):
    """Found by tests/test_chaos.py: a client whose first message the sidecar holds
    (Gemini's setup) resets before that message is whole, on the ws or the wss
    listener. Its refusal's close frame was written to the lost transport, whose closed
    handle raised: an `internal_error` line with a traceback (counted
    result="internal_error"), then the last-resort handler's own write raised too (a
    `loop_error` when the task was freed). The held reader's end does not cancel the
    opening as ClientHandshake's does: the refusal now writes nothing to a client
    that is gone. (Found by the leak review: it was still counted as refused with a
    1000 from the sidecar, `result="normal"` and `closes_total{side="sidecar"}`, though
    no close went out; it is `client_gone`, as a reset at any other point of the
    opening.)"""
    import ssl
    tls_port = held_port()
    sidecar = SidecarProcess(
        str(tmp_path),
        '[providers.gemini]\nurl = "ws://127.0.0.1:9/g?key={secret}"\nsecret_env = "PROVIDER_KEY"\n',
        standard_keys(),
        extra=self_signed_tls(tls_port, tmp_path / "public" / "ca.pem", tmp_path / "private")).start()
    part = masked(0x01, b'{"setup": {"model":')[:12]
    cases = [(tls, sent) for tls in (False, True) for sent in (b"", part)]
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "public" / "ca.pem"))
        for tls, sent in cases:
            s = socket.create_connection(("127.0.0.1", tls_port if tls else sidecar.port), timeout=5)
            if tls:
                s = context.wrap_socket(s, server_hostname="127.0.0.1")
            with s:
                s.sendall(request("/v1/realtime/connect?provider=gemini", key=sidecar.keys.plain["good"]))
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(1000)
                assert head.startswith(b"HTTP/1.1 101 ")
                s.sendall(sent)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: a reset
        deadline = time.monotonic() + 5
        gone = f'conduit_connections_total{{result="client_gone"}} {float(len(cases))}'
        while gone not in (text := http_get(sidecar.admin("/metrics"))[1]):
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        assert "\nconduit_connections_pending 0.0\n" in text
        assert "\nconduit_connections_active 0.0\n" in text
        assert 'result="internal_error"' not in text
        assert 'result="normal"' not in text and 'side="sidecar"' not in text
    finally:
        sidecar.stop()
    assert [line["event"] for line in sidecar.log_lines() if line.get("level") == "error"] == []
    assert "Traceback" not in sidecar.output()


@pytest.mark.parametrize("leave", ["end", "reset"])
def test_a_client_that_leaves_while_the_provider_greets_frees_its_slot_and_the_provider(tmp_path, leave):
    """Found by a probe after tests/test_chaos.py: Deepgram's agent speaks first (its
    Welcome goes to the client before the client's Settings is held). A client that
    left while the Welcome was awaited cancelled the opening outside the part that
    releases: the session stayed live for good (conduit_connections_active 1, the key's
    max_connections slot taken: the next session got 4029) and the provider's
    connection stayed open."""
    upstream_port = held_port()
    keys, sidecar = _one_slot_sidecar(
        tmp_path,
        f'[providers.deepgram_agent]\nurl = "ws://127.0.0.1:{upstream_port}/v1/agent/converse"\n'
        'headers = { Authorization = "Token {secret}" }\nsecret_env = "PROVIDER_KEY"\n')
    path = "/v1/agent/converse"
    upgrade = request(path, headers={"Authorization": f"Token {keys.plain['one']}"})

    async def body():
        let_go = asyncio.Event()

        async def provider(reader, writer):   # answers 101, then no Welcome for 10 s
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(switching_protocols(head))
            try:
                await asyncio.wait_for(reader.read(), 10)
                let_go.set()
            except (TimeoutError, ConnectionError):
                pass
            writer.close()
        async with await asyncio.start_server(provider, "127.0.0.1", upstream_port):
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(upgrade)
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
            await asyncio.sleep(0.2)                             # the Welcome is awaited
            if leave == "reset":
                reset(writer.transport)
            else:
                writer.write_eof()
            await asyncio.wait_for(let_go.wait(), 5)             # the provider is let go
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(upgrade)                                # the key's one slot is free
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
            await asyncio.sleep(0.3)
            assert not (data := reader._buffer), data            # no close 4029
            writer.close()
    try:
        run(body())
        counts = http_get(sidecar.admin("/metrics"))[1]
    finally:
        sidecar.stop()
    assert 'conduit_connections_total{result="client_gone"}' in counts  # (the second one's too, maybe)
    assert 'result="key_limit"' not in counts
    assert "Traceback" not in sidecar.output()


def test_a_provider_that_closes_before_its_welcome_frees_the_keys_slot(tmp_path):
    """Deepgram's agent: a provider that ends the session instead of its Welcome. The
    client reads the provider's close, and the session is released (nothing tested
    that it was: without the release the key's one slot stayed taken, 4029 after)."""
    from websockets.asyncio.server import serve
    upstream_port = held_port()
    keys, sidecar = _one_slot_sidecar(
        tmp_path,
        f'[providers.deepgram_agent]\nurl = "ws://127.0.0.1:{upstream_port}/v1/agent/converse"\n'
        'headers = { Authorization = "Token {secret}" }\nsecret_env = "PROVIDER_KEY"\n')
    greets = iter([False, True])

    async def provider(ws):      # the first session closed at once, the next one welcomed
        if not next(greets):
            await ws.close(4000, "no agent today")
            return
        await ws.send(json.dumps({"type": "Welcome", "request_id": "x"}))
        await ws.wait_closed()

    async def body():
        url = f"ws://127.0.0.1:{sidecar.port}/v1/agent/converse"
        auth = {"Authorization": f"Token {keys.plain['one']}"}
        async with serve(provider, "127.0.0.1", upstream_port):
            async with connect(url, additional_headers=auth, open_timeout=5) as ws:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
                assert (ws.close_code, ws.close_reason) == (4000, "no agent today")
            async with connect(url, additional_headers=auth, open_timeout=5) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "Welcome"
    try:
        run(body())
    finally:
        sidecar.stop()


def test_a_session_greeted_after_the_drain_ended_is_closed_going_away(tmp_path):
    """Deepgram's agent: the drain's end (close_all) told only sessions with a relay.
    A session whose provider's Welcome came after it started relaying unannounced, and
    the sidecar waited on it past drain_seconds for as long as the client stayed: the
    `host.closing` check ran before the Welcome and Settings, not after. Then it got
    the Welcome and 1001 after its Settings; now the drain's end answers a Welcome
    still awaited at once. (The provider here does not greet before the drain's end,
    nor after it: a Welcome 1 s after the session's start, against a read of 1 s, made
    a race of the drain's end on a loaded machine.)"""
    import os
    import signal

    from websockets.asyncio.server import serve
    keys = Keys()
    keys.add("one")
    upstream_port = held_port()

    async def provider(ws):  # its Welcome only after the drain's end, for good
        await ws.wait_closed()

    sidecar = SidecarProcess(
        str(tmp_path),
        f'[providers.deepgram_agent]\nurl = "ws://127.0.0.1:{upstream_port}/v1/agent/converse"\n'
        'headers = { Authorization = "Token {secret}" }\nsecret_env = "PROVIDER_KEY"\n',
        keys, limits="drain_seconds = 0.2\nclose_timeout_seconds = 1").start()

    async def body():
        async with serve(provider, "127.0.0.1", upstream_port):
            async with connect(f"ws://127.0.0.1:{sidecar.port}/v1/agent/converse",
                               additional_headers={"Authorization": f"Token {keys.plain['one']}"},
                               open_timeout=5, close_timeout=1) as ws:
                os.kill(sidecar.pid, signal.SIGTERM)               # the drain: over in 0.2 s
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)          # no Welcome waited for
                assert (ws.close_code, ws.close_reason) == (1001, "going away")
    try:
        run(body())
        assert sidecar.wait(5) == 0
    finally:
        sidecar.stop()
    assert "Traceback" not in sidecar.output()


def test_the_mock_provider_keeps_answering_however_much_it_logs():
    """conftest's mock writes a traceback for each connection that ends without a close;
    its output, a pipe, must be read, or once 64 KiB are unread the mock blocks in a
    write, and every later session through the suite's shared mock times out."""
    mock = MockProcess()
    upgrade = request("/v1/realtime?model=mock-realtime", headers={"Host": "127.0.0.1"},
                      key=PROVIDER_SECRET)
    try:
        for _ in range(150):                     # ~1.2 KiB of traceback each
            with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as s:
                s.sendall(upgrade)
                assert s.recv(12) == b"HTTP/1.1 101"
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        async def body():
            async with connect(f"ws://127.0.0.1:{mock.port}/v1/realtime?model=mock-realtime",
                               additional_headers={"Authorization": f"Bearer {PROVIDER_SECRET}"},
                               open_timeout=5) as ws:
                return await ws.recv()
        assert "session.created" in run(body())
    finally:
        mock.stop()


def test_a_tls_handshake_that_completes_as_its_attempt_times_out_leaves_no_error_unretrieved(tmp_path):
    """The provider's TLS flight and the connect timeout come in the same loop turn (the
    loop held up meanwhile, as on a loaded machine, or the stop cancelling the attempt
    then): the handshake completes, then the attempt ends (timeout, TLS stage) and drops
    the connection, whose loss set a failure on the upgrade's result, which nobody
    awaited any more: asyncio logged it as never retrieved (a loop_error line naming
    upstream.Failed, at the next collection or at exit). In process, to line the two up
    every time: a callback holds the loop (callbacks run before the turn's poll) while
    the flight is sent and the timeout passes; the poll then reads the flight, and the
    same turn's timers cancel the attempt. (A SIGSTOPped sidecar seldom lines up: its
    epoll_wait returns EINTR at SIGCONT, and libuv skips a poll whose time has passed.)"""
    import gc
    import ssl
    import threading

    from conduit_sidecar import upstream
    from conduit_sidecar.testing import CA
    from test_deployments import _balancer

    ca = CA()
    context = ca.server_context(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    balancer, router = _balancer(
        f'[providers.p]\nurl = "wss://127.0.0.1:{listener.getsockname()[1]}/"\n'
        f'ca_file = "{ca.write(tmp_path / "provider-ca.pem")}"\n')
    held, read = threading.Event(), []
    timeout = 1.0

    def provider(loop):
        """Reads the ClientHello, holds the loop, sends its flight while it is held,
        then reads what the sidecar sends next (its Finished, when the turn lined up)."""
        leg, _ = listener.accept()
        with leg:
            leg.settimeout(10)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing, server_side=True)
            while not outgoing.pending:
                incoming.write(leg.recv(65536))
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.do_handshake()
            loop.call_soon_threadsafe(hold)
            assert held.wait(10)
            leg.sendall(outgoing.read())
            with contextlib.suppress(OSError):
                read.append(leg.recv(65536))

    def hold():
        held.set()
        time.sleep(timeout + 0.1)  # the flight arrives; the timeout (armed before) passes

    async def body():
        loop = asyncio.get_running_loop()
        unretrieved: list[dict] = []
        loop.set_exception_handler(lambda _, context: unretrieved.append(context))
        thread = threading.Thread(target=provider, args=(loop,))
        thread.start()
        h = balancer.health["p"][0]
        target = router.upstream(h.target, None)
        error = None
        try:
            await upstream._attempt(balancer._request(target, None), target, timeout, False,
                                    balancer.max_rest, balancer.tls_sessions, balancer.resolver)
        except upstream.Failed as exc:
            error = str(exc)  # (its traceback, which holds the attempt's frame, goes here)
        finally:
            await asyncio.to_thread(thread.join, 10)
        gc.collect()  # a future dropped with its exception unretrieved is logged here
        await asyncio.sleep(0)
        return error, unretrieved
    with listener:
        error, unretrieved = run(body())
    assert error == "upstream timed out (TLS handshake)"
    assert read and read[0], read  # the sidecar's Finished: the two lined up
    assert unretrieved == []
