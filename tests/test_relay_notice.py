"""`Relay.close(..., client_notice=...)`: the client gets one text message, then the
sidecar's close, never inside a frame in flight. The relay runs in this process
between a websockets client and a hand-written upstream, all over loopback."""

import asyncio
import base64
import os

import pytest
from conftest import HttpHead, UpgradeAnswer, run, switching_protocols
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conduit_sidecar import _relay

NOTICE = b'{"type":"error","error":{"code":"budget_exhausted"}}'


class _Upstream(UpgradeAnswer):
    """Answers the upgrade, then hands its transport to the test."""

    def __init__(self, ready):
        super().__init__()
        self.ready = ready

    def answer(self, head):
        super().answer(head)
        self.ready.set_result(self.transport)


async def _session(markers=(), on_message=None, on_client_message=None, upstream=_Upstream):
    """(relay, websockets client, upstream transport); the relay sits between them,
    metering the upstream's messages with `markers` for `on_message` (and reading the
    client's text messages whole for `on_client_message`)."""
    loop = asyncio.get_running_loop()
    upstream_ready, relays = loop.create_future(), loop.create_future()
    up_server = await loop.create_server(lambda: upstream(upstream_ready), "127.0.0.1", 0)
    up_port = up_server.sockets[0].getsockname()[1]

    async def front(head_proto):
        head = await head_proto.done
        client = head_proto.transport
        upstream, up = await loop.create_connection(HttpHead, "127.0.0.1", up_port)
        key = base64.b64encode(os.urandom(16))
        upstream.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                       b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
        response = await up.done
        client.write(switching_protocols(head))
        relay = _relay.Relay(loop, 1 << 30, 2.0, lambda r: None, markers, on_message,
                             on_client_message=on_client_message)
        relay.start(client, upstream, b"", response.split(b"\r\n\r\n", 1)[1])
        client.resume_reading()
        upstream.resume_reading()
        relays.set_result(relay)

    def accept():
        proto = HttpHead()
        loop.create_task(front(proto))
        return proto

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ws = await connect(f"ws://127.0.0.1:{port}/", compression=None, max_size=None,
                       ping_interval=None)
    return relays.result() if relays.done() else await relays, ws, await upstream_ready


async def _rest(ws):
    """Messages until the close, and the close code and reason."""
    got = []
    try:
        while True:
            got.append(await asyncio.wait_for(ws.recv(), 5))
    except ConnectionClosed as closed:
        return got, closed.rcvd.code, closed.rcvd.reason


def test_notice_then_close_code():
    async def body():
        relay, ws, upstream = await _session()
        upstream.write(bytes([0x81, 5]) + b"hello")
        assert await ws.recv() == "hello"
        relay.close(_relay.CloseCode.BUDGET_EXHAUSTED, "budget exhausted", 1000, "",
                    client_notice=NOTICE)
        return await _rest(ws)
    got, code, reason = run(body())
    assert got == [NOTICE.decode()]
    assert (code, reason) == (4002, "budget exhausted")


def test_notice_waits_for_the_frame_in_flight():
    """The close is asked for while a 1 MiB frame to the client is half through: the
    client gets the whole frame, then the notice, then the close."""
    payload = os.urandom(1 << 20)
    frame = bytes([0x82, 127]) + len(payload).to_bytes(8, "big") + payload

    async def body():
        relay, ws, upstream = await _session()
        upstream.write(frame[:300_000])
        await asyncio.sleep(0.2)            # the relay has forwarded part of it
        relay.close(_relay.CloseCode.BUDGET_EXHAUSTED, "budget exhausted", 1000, "",
                    client_notice=NOTICE)
        assert relay.client.state == _relay.LegState.CLOSE_QUEUED
        await asyncio.sleep(0.1)
        upstream.write(frame[300_000:])
        return await _rest(ws)
    got, code, reason = run(body())
    assert got == [payload, NOTICE.decode()]
    assert (code, reason) == (4002, "budget exhausted")


def test_no_notice_between_fragments():
    """A text frame cannot go inside a fragmented message: the close goes alone."""
    async def body():
        relay, ws, upstream = await _session()
        upstream.write(bytes([0x01, 3]) + b"abc")        # a first fragment, no FIN
        await asyncio.sleep(0.2)
        relay.close(_relay.CloseCode.BUDGET_EXHAUSTED, "budget exhausted", 1000, "",
                    client_notice=NOTICE)
        return await _rest(ws)
    got, code, reason = run(body())
    assert got == []
    assert (code, reason) == (4002, "budget exhausted")


def test_no_notice_after_a_fragment_in_flight():
    """The close is asked for while a first fragment (no FIN) to the client is half
    through: at its end the message is still unfinished, so the close goes alone.
    Nothing tested that (with the notice sent at that frame's end, the client read a
    text frame inside a fragmented message: 1002)."""
    payload = os.urandom(1 << 20)
    fragment = bytes([0x02, 127]) + len(payload).to_bytes(8, "big") + payload

    async def body():
        relay, ws, upstream = await _session()
        upstream.write(fragment[:300_000])
        await asyncio.sleep(0.2)            # the relay has forwarded part of it
        relay.close(_relay.CloseCode.BUDGET_EXHAUSTED, "budget exhausted", 1000, "",
                    client_notice=NOTICE)
        await asyncio.sleep(0.1)
        upstream.write(fragment[300_000:])
        return await _rest(ws)
    got, code, reason = run(body())
    assert got == []
    assert (code, reason) == (4002, "budget exhausted")


def test_a_notice_must_be_utf8():
    async def body():
        relay, ws, upstream = await _session()
        with pytest.raises(UnicodeDecodeError):
            relay.close(1001, "going away", 1001, "", client_notice=b"\xff")
        relay.close(1001, "going away", 1001, "")
        return await _rest(ws)
    got, code, _ = run(body())
    assert got == [] and code == 1001


def _text(payload: bytes) -> bytes:
    header = bytes([0x81, len(payload)]) if len(payload) < 126 else \
        bytes([0x81, 126]) + len(payload).to_bytes(2, "big")
    return header + payload


DELTA = b'{"type":"response.delta","x":1}'
DONE = b'{"type":"response.done","usage":{"total_tokens":99}}'


def _budget_close(relay, message):
    """What a usage report over a budget does (server.provider_message, governance)."""
    relay.close(_relay.CloseCode.BUDGET_EXHAUSTED, "budget exhausted", 1000, "", client_notice=NOTICE)


@pytest.mark.parametrize("split", [None, 100])
def test_a_close_from_a_usage_report_comes_after_the_message_that_reported_it(split):
    """The provider's messages and the report that crosses the budget arrive in one
    read (or the report split across two): the client gets them in order, then the
    notice and the close. The close was written ahead of the read's messages, or
    inside the report when it was split (a corrupt stream)."""
    done = DONE + b" " * (300 if split else 0)      # JSON allows trailing whitespace

    async def body():
        relay, ws, upstream = await _session((b'"response.done"',), _budget_close)
        data = _text(DELTA) + _text(done)
        if split is None:
            upstream.write(data)
        else:
            upstream.write(data[:len(data) - split])
            await asyncio.sleep(0.1)
            upstream.write(data[len(data) - split:])
        return await _rest(ws)
    got, code, reason = run(body())
    assert got == [DELTA.decode(), done.decode(), NOTICE.decode()]
    assert (code, reason) == (4002, "budget exhausted")


class _Recording(_Upstream):
    """An upstream that keeps what the relay writes to it after the upgrade; `lost`
    holds it once the connection is gone. The session hands the test this protocol."""

    def __init__(self, ready):
        super().__init__(ready)
        self.got = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def answer(self, head):
        UpgradeAnswer.answer(self, head)
        self.ready.set_result(self)

    def data_received(self, data):
        if self.head is None:
            self.got += data
        else:
            super().data_received(data)

    def connection_lost(self, exc):
        self.lost.set_result(bytes(self.got))


def _masked_close(frame: bytes) -> tuple[int, str]:
    assert frame[:1] == b"\x88" and frame[1] & 0x80 and len(frame) == 6 + (frame[1] & 0x7F)
    payload = bytes(b ^ frame[2 + i % 4] for i, b in enumerate(frame[6:]))
    return int.from_bytes(payload[:2], "big"), payload[2:].decode()


@pytest.mark.parametrize("end, close", [("sidecar", (1000, "")), ("client lost", (1001, "client went away"))])
def test_a_withheld_frame_does_not_hold_the_providers_close(end, close):
    """A client text frame read whole is half through when the session ends (the
    sidecar closes it, or the client is lost). None of it went to the provider, so
    its close goes at once. It waited for the frame's end as if part of it had gone:
    the close timeout dropped the provider without a close, and a lost client's
    provider was dropped at once."""
    async def body():
        relay, ws, upstream = await _session(on_client_message=lambda relay, message: None,
                                             upstream=_Recording)
        ws.transport.write(bytes([0x81, 0xFE, 0x10, 0x00]) + os.urandom(4) + b"x" * 1000)  # of 4096
        while relay.counters(0)[2] == 0:    # the frame's header is read
            await asyncio.sleep(0.01)
        if end == "sidecar":
            relay.close(4001, "key revoked", 1000, "")
        else:
            ws.transport.abort()
        return await upstream.lost
    assert _masked_close(run(body())) == close


def test_a_violator_closed_by_the_sidecar_is_shut_when_the_provider_goes():
    """A client that broke the protocol is read no more. When the sidecar closed the
    session within the violation's grace (a revoked key, a drain) and the provider then
    ended its connection without answering, the client, its close out, was left
    waiting for an answer nothing would read, until the close timeout: it is shut
    at once, as before 11b268a. (Such a close now leaves the violation's codes: the
    provider's close is the violation's, after the grace.)"""
    async def body():
        loop = asyncio.get_running_loop()
        accepted = asyncio.Queue()

        class Side(asyncio.Protocol):
            def connection_made(self, transport):
                transport.pause_reading()
                accepted.put_nowait(transport)

        server = await loop.create_server(Side, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client_r, client_w = await asyncio.open_connection("127.0.0.1", port)
        client = await accepted.get()
        up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
        upstream = await accepted.get()
        relay = _relay.Relay(loop, 1 << 20, 60.0, lambda r: None)
        # A masked frame with the reserved opcode 3: the client violates as the relay starts.
        relay.start(client, upstream, bytes([0x83, 0x80]) + os.urandom(4))
        client.resume_reading()
        upstream.resume_reading()
        relay.close(4001, "key revoked", 1000, "")          # within the grace
        reason = b"client: reserved opcode 3"
        assert (await up_r.readexactly(2)) == bytes([0x88, 0x80 | 2 + len(reason)])  # our close to the provider
        up_w.close()                                        # gone without an answer
        while relay.upstream.state != _relay.LegState.LOST:
            await asyncio.sleep(0.01)
        state = relay.client.state
        relay.abort()
        client_w.close()
        server.close()
        return state
    assert run(body()) in (_relay.LegState.SHUT, _relay.LegState.LOST)
