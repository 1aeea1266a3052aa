"""Limits: global connections (1013), connections in their handshake (503), handshake
timeout, closing-handshake timeout, idle timeout."""

import asyncio
import select
import socket
import time

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from conftest import (SidecarProcess, http_get, raw_upstream_sidecar, run, socket_buffers, standard_keys,
                      switching_protocols)
from test_bad_input import refusal_statuses
from test_governance import metric


@pytest.fixture(scope="module")
def limited(tmp_path_factory, mock_provider):
    sidecar = raw_upstream_sidecar(str(tmp_path_factory.mktemp("limits")),
                                   "max_connections = 2\nhandshake_timeout_seconds = 0.5\n"
                                   "close_timeout_seconds = 0.5\nidle_timeout_seconds = 1\n",
                                   mock_provider.section())
    yield sidecar
    sidecar.stop()


@pytest.fixture(scope="module")
def slots(tmp_path_factory, mock_provider):
    """A sidecar of two handshake slots that tests hold with half-requests (or refused
    clients that never close), which its handshake (close) timeout never cuts during a
    test: `limited`'s (0.5 s) could pass before the test's next step on a loaded machine."""
    sidecar = SidecarProcess(str(tmp_path_factory.mktemp("slots")), mock_provider.section(), standard_keys(),
                             limits="max_connections = 2\nhandshake_timeout_seconds = 30\n"
                                    "close_timeout_seconds = 30\n").start()
    yield sidecar
    sidecar.stop()


def test_global_limit_gets_1013(limited):
    async def body():
        a = await connect(limited.url(), additional_headers=limited.auth())
        b = await connect(limited.url(), additional_headers=limited.auth("other"))
        await a.recv(), await b.recv()
        with pytest.raises(ConnectionClosed) as exc:
            async with connect(limited.url(), additional_headers=limited.auth()) as c:
                await c.recv()
        assert exc.value.rcvd.code == 1013 and "try again later" in exc.value.rcvd.reason
        await a.close()
        await b.close()
    run(body())
    # The key of the session turned away, looked up for its line (it logged null).
    refused = limited.wait_lines(lambda line: line.get("event") == "rejected" and line["code"] == 1013)
    assert [line["key_id"] for line in refused] == ["good"]


def pending_becomes(sidecar, value: int, gauge: str = "conduit_connections_pending") -> None:
    deadline = time.monotonic() + 5
    while (got := metric(sidecar, gauge)) != value:
        assert time.monotonic() < deadline, f"{gauge} is {got}, not {value}"
        time.sleep(0.05)


def partial(sidecar) -> socket.socket:
    """A connection that holds a handshake slot: half a request, and no more yet."""
    s = socket.create_connection(("127.0.0.1", sidecar.port), timeout=5)
    s.sendall(b"GET /v1/realtime/connect HTTP/1.1\r\nHost: x\r\n")
    return s


def test_connections_in_their_handshake_are_bounded_by_max_connections(slots):
    """Before any key is checked a peer can hold only max_connections connections, each
    bounded by max_request_bytes: past them a connection gets 503 at once. A slot is
    free again when its connection ends; a session holds none."""
    def refusals():
        return metric(slots, 'conduit_connections_total{result="too_many_handshakes"}')

    before, logged = refusals(), len(slots.log_lines())
    a, b = partial(slots), partial(slots)
    try:
        pending_becomes(slots, 2)
        with socket.create_connection(("127.0.0.1", slots.port)) as c:
            c.settimeout(5)
            answer = b""
            while chunk := c.recv(1000):
                answer += chunk
    finally:
        a.close()
        b.close()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert answer.endswith(b"too many connections in their handshake\n")
    assert refusals() == before + 1
    assert refusal_statuses(slots, logged) == [503]  # and a line says so, as for any refusal
    pending_becomes(slots, 0)  # their ends are handled

    async def body():
        async with connect(slots.url(), additional_headers=slots.auth()) as ws:
            await ws.recv()
            # one session open, two half-requests: neither is answered at once
            c1, c2 = partial(slots), partial(slots)
            answered, _, _ = select.select([c1, c2], [], [], 0.2)
            c1.close()
            c2.close()
            return answered
    assert run(body()) == []
    assert refusals() == before + 1
    pending_becomes(slots, 0)


def test_a_signed_url_call_gives_its_slot_back(limited):
    """A get-signed-url call holds a handshake slot while it is answered (here a 401:
    no key), then gives it back: three calls past max_connections (2), a session still
    opens (nothing tested the give: without it the third call, and every later
    connection, got 503)."""
    for _ in range(3):
        assert http_get(f"http://127.0.0.1:{limited.port}/v1/convai/conversation/get-signed-url"
                        "?agent_id=a")[0] == 401
    pending_becomes(limited, 0)

    async def body():
        async with connect(limited.url(), additional_headers=limited.auth()) as ws:
            await ws.recv()
    run(body())


def test_rejected_clients_that_never_close_hold_the_same_slots(limited, slots):
    """After a refusal the sidecar waits up to close_timeout_seconds for the client's
    close; those connections count among the max_connections without a session. They
    hold `slots`' (its close timeout 30 s), and one is cut at `limited`'s (0.5 s), which
    could pass before the next step on a loaded machine had it held the slots."""
    def rejected(sidecar):
        s = socket.create_connection(("127.0.0.1", sidecar.port))
        s.settimeout(5)
        s.sendall(b"GET /v1/realtime/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer condt_wrong\r\n\r\n")
        data = b""
        while b"unknown key" not in data:  # 101, then close 4001 "unknown key"
            chunk = s.recv(1000)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 101 ")
        return s  # and it never sends its close

    def answered_within(seconds: float) -> bytes:
        with socket.create_connection(("127.0.0.1", slots.port)) as s:
            s.settimeout(seconds)
            try:
                return s.recv(100)
            except socket.timeout:
                return b""

    a, b = rejected(slots), rejected(slots)
    try:
        pending_becomes(slots, 2)
        # Answered at once, though a loaded machine may take longer than the 0.3 s below.
        assert answered_within(5).startswith(b"HTTP/1.1 503 ")
    finally:
        a.close()
        b.close()
    pending_becomes(slots, 0)               # their ends free the slots
    assert answered_within(0.3) == b""      # a slot is free: the request is awaited
    pending_becomes(slots, 0)
    with rejected(limited) as c:
        assert c.recv(100) == b""           # cut off at the close timeout (recv waits up to 5 s)
        pending_becomes(limited, 0)         # which frees its slot


def test_a_silent_connection_is_cut_at_the_handshake_timeout(limited):
    def timeouts():
        return metric(limited, 'conduit_connections_total{result="handshake_timeout"}')

    before, logged = timeouts(), len(limited.log_lines())
    with socket.create_connection(("127.0.0.1", limited.port)) as s:
        s.settimeout(5)                                         # half the 10 s default
        s.sendall(b"GET /v1/realtime/connect HTTP/1.1\r\n")    # and then nothing
        assert s.recv(100) == b""                               # closed by the sidecar
    assert timeouts() == before + 1                             # by its handshake timer
    # And a line says so, as one does for every other outcome of a connection.
    deadline = time.monotonic() + 5  # (written at the end of the loop turn that cut it)
    while not (cut := [l for l in limited.log_lines()[logged:] if l.get("event") == "handshake_timeout"]):
        assert time.monotonic() < deadline, "no handshake_timeout line"
        time.sleep(0.05)
    assert [(line["seconds"], line["reason"]) for line in cut] == [(0.5, "request")]


def test_a_peer_that_never_answers_a_close_is_cut_off(limited):
    """The provider closes with 4000; the client never answers the close. At the close
    timeout the sidecar answers the provider itself (1001, said nowhere else) and cuts
    the client off: the client's socket ends without an answer ever sent."""
    answered = []

    async def body():
        async def handler(ws):
            await ws.close(4000, "bye")
            answered.append((ws.close_code, ws.close_reason))
        async with serve(handler, "127.0.0.1", limited.upstream_port):
            reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
            key = limited.keys.plain["good"]
            writer.write(f"GET /v1/realtime/connect?provider=raw HTTP/1.1\r\nHost: x\r\n"
                         f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
            await reader.readuntil(b"\r\n\r\n")
            data = b""
            while chunk := await asyncio.wait_for(reader.read(100), 5):
                data += chunk
            assert data[:4] == bytes([0x88, 5, 0x0F, 0xA0])       # close 4000 "bye"
    run(body())
    assert answered == [(1001, "client did not answer the close")]


def test_idle_sessions_are_closed(limited):
    async def body():
        async with connect(limited.url(), additional_headers=limited.auth()) as ws:
            await ws.recv()
            # Activity keeps it open, for twice the idle limit (1 s): a message each
            # 0.05 s leaves 0.95 s to a process held up on a loaded machine (one each
            # 0.3 s with a 0.6 s limit left 0.3 s, and a stall of 0.3-0.8 s ended the
            # session as idle).
            end = time.monotonic() + 2
            while time.monotonic() < end:
                await asyncio.sleep(0.05)
                await ws.send(b"x")
                await ws.recv()
            with pytest.raises(ConnectionClosed) as exc:
                await asyncio.wait_for(ws.recv(), 5)
            return exc.value.rcvd.code, exc.value.rcvd.reason
    assert run(body()) == (1001, "idle timeout")


@pytest.mark.parametrize("size", [65536, 98304])
def test_socket_buffer_bytes_bounds_both_legs_kernel_buffers(tmp_path, mock_provider, size):
    """limits.socket_buffer_bytes: a client's socket from its accept (a connection that
    has sent nothing yet included), and a provider's once relaying, have their send and
    receive buffers fixed (the kernel keeps double the value, for its bookkeeping), so
    a stalled peer makes the kernel hold that much for a session, not the megabytes of
    its own sizing (tests/test_k8s.py measures both)."""
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), standard_keys(),
                             limits=f"socket_buffer_bytes = {size}\n").start()
    try:
        async def body():
            _, silent = await asyncio.open_connection("127.0.0.1", sidecar.port)
            async with connect(sidecar.url(), additional_headers=sidecar.auth()) as ws:
                await ws.recv()     # relayed: the relay has both legs
                found = socket_buffers(sidecar.proc.pid)
            silent.close()
            return found
        sockets = run(body())
    finally:
        sidecar.stop()
    assert [(s["rb"], s["tb"]) for s in sockets] == [(2 * size, 2 * size)] * 3, sockets


def test_one_long_frame_streaming_is_not_idle(limited):
    """The provider streams one 200 KiB frame over 2 s, bytes flowing all along, past
    the 1 s idle limit: not idle. Idle detection counted frames, so the session was
    closed 1001 once the frame was through."""
    size = 200 * 1024

    async def provider(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(switching_protocols(head) + bytes([0x82, 127]) + size.to_bytes(8, "big"))
        for _ in range(20):
            writer.write(b"a" * (size // 20))
            await asyncio.sleep(0.1)
        writer.write(bytes([0x88, 2, 0x03, 0xE8]))  # close 1000
        await reader.read()
        writer.close()

    async def body():
        server = await asyncio.start_server(provider, "127.0.0.1", limited.upstream_port)
        async with server:
            async with connect(limited.url(provider="raw"), additional_headers=limited.auth(),
                               max_size=None) as ws:
                message = await ws.recv()
                with pytest.raises(ConnectionClosed) as exc:
                    await ws.recv()
            return len(message), exc.value.rcvd.code
    assert run(body()) == (size, 1000)


def test_a_client_refused_for_want_of_a_slot_reads_its_503_whole(slots):
    """The 503 for too many connections in their handshake goes out before the
    client's request is read: a client that sends its request (and frames past it)
    before it reads must still read the answer and an end. The socket closed at once,
    and answered the request with a reset: 3 in 5 plain requests, every one followed
    by a megabyte, read a reset instead of the 503. It lingers now, as the other
    refusals do, in a slot of its own (max_connections of them)."""
    a, b = partial(slots), partial(slots)
    try:
        pending_becomes(slots, 2)
        with socket.create_connection(("127.0.0.1", slots.port), timeout=5) as c:
            c.sendall(b"GET /v1/realtime/connect HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * (1 << 20))
            answer = b""
            while chunk := c.recv(65536):             # no ConnectionResetError
                answer += chunk
    finally:
        a.close()
        b.close()
    assert answer.startswith(b"HTTP/1.1 503 ")
    pending_becomes(slots, 0)


def still_read(s: socket.socket) -> bool:
    """Whether the sidecar still reads `s` (a lingering close): a closed socket answers
    what is sent with a reset."""
    try:
        s.sendall(b"x" * 1000)
        time.sleep(0.05)                          # a closed socket's reset comes back
        s.sendall(b"x" * 1000)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def test_the_503s_lingering_are_bounded_by_max_connections(slots):
    """Lingering 503s hold a slot of their own pool: past max_connections of them the
    next 503 closes at once, as before (a send after it is answered with a reset)."""
    def turned_away():
        s = socket.create_connection(("127.0.0.1", slots.port), timeout=5)
        answer = b""
        while chunk := s.recv(1000):                  # the 503, then the sidecar's end
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ")
        return s

    for _ in range(3):
        held = [partial(slots), partial(slots)]
        try:
            pending_becomes(slots, 2)
            lingered = []
            for _ in range(3):                        # lingering: max_connections of them
                held.append(turned_away())
                lingered.append(still_read(held[-1]))
            # A lingering close lasts 1 s at most, which a loaded machine can outlast
            # in between: then the first two no longer held their slots, and it is tried
            # again. (Without a bound, the first two still lingering, the third did too.)
            if still_read(held[2]) and still_read(held[3]):
                break
        finally:
            for s in held:
                s.close()
        pending_becomes(slots, 0)
    else:
        pytest.fail("the first two 503s were never both still lingering after the third")
    assert lingered == [True, True, False]
    pending_becomes(slots, 0)


def refused_lingering(sidecar) -> tuple[socket.socket, bytes, float]:
    """A refused connection read to the sidecar's end (its lingering close then runs
    until our end, 1 s at most), its answer, and conduit_connections_lingering read
    then. A loaded machine can take longer than that 1 s before the reading: a reading
    of 0 counts only if the socket still lingers after it, else it is all done again."""
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", sidecar.port), timeout=5)
        s.sendall(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):                 # the refusal, then the sidecar's end
            answer += chunk
        lingering = metric(sidecar, "conduit_connections_lingering")
        if lingering or still_read(s):
            return s, answer, lingering
        s.close()
    pytest.fail("the lingering close was over before each reading")


def test_lingering_closes_are_counted_in_a_gauge(limited):
    """A refused connection lingers (its slot taken until the client's end or 1 s):
    conduit_connections_lingering counts it, and no other gauge did."""
    pending_becomes(limited, 0, "conduit_connections_lingering")   # earlier tests' are over
    s, answer, lingering = refused_lingering(limited)
    with s:
        assert answer.startswith(b"HTTP/1.1 4")
        assert lingering == 1                         # until our end, at most 1 s
    pending_becomes(limited, 0, "conduit_connections_lingering")


def test_a_lingering_close_ends_at_its_bound_though_the_peer_never_does(limited):
    """A refused client that reads the answer and our end, then neither sends, ends,
    nor goes: its lingering close (a descriptor, a slot of the pool) ends at its bound
    (1 s), not at the peer's pleasure. Nothing else guarded that bound."""
    pending_becomes(limited, 0, "conduit_connections_lingering")
    s, _, lingering = refused_lingering(limited)
    with s:
        assert lingering == 1
        pending_becomes(limited, 0, "conduit_connections_lingering")   # the client still there
