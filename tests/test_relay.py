"""Frames through the sidecar to the mock provider and back, with a websockets
client: byte-identical, in order, every size class of the frame header."""

import asyncio
import os

from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from conftest import run, short_frame, switching_protocols
from test_bad_input import request

SIZES = [0, 1, 125, 126, 65535, 65536, 16 * 1024 * 1024]


def connect_to(sidecar, key="good", **kw):
    return connect(sidecar.url(), additional_headers=sidecar.auth(key), compression=None,
                   max_size=None, ping_interval=None, **kw)


def test_session_created_then_binary_and_text_round_trip(sidecar):
    async def body():
        async with connect_to(sidecar) as ws:
            first = await ws.recv()
            assert '"type":"session.created"' in first
            for size in SIZES:
                payload = os.urandom(size)
                await ws.send(payload)
                assert await ws.recv() == payload, size
                text = "é" * (size // 2) + "a" * (size % 2)
                await ws.send(text)
                assert await ws.recv() == text, size
    run(body())


def test_order_is_kept_under_a_burst(sidecar):
    async def body():
        async with connect_to(sidecar) as ws:
            await ws.recv()
            frames = [os.urandom(960) + i.to_bytes(4, "big") for i in range(2000)]
            for f in frames:
                await ws.send(f)
            got = [await ws.recv() for _ in frames]
            assert got == frames
    run(body())


def test_fragmented_messages_pass_whole(sidecar):
    async def body():
        async with connect_to(sidecar) as ws:
            await ws.recv()
            chunks = [os.urandom(n) for n in (0, 10, 125, 126, 70000)]
            await ws.send(iter(chunks))                  # binary, five fragments
            assert await ws.recv() == b"".join(chunks)
            parts = ["héllo ", "", "wörld" * 1000]
            await ws.send(iter(parts))                   # text, three fragments
            assert await ws.recv() == "".join(parts)
    run(body())


def test_ping_pong_go_end_to_end(sidecar, upstream_ports):
    """The client's ping reaches the provider (as the client masked it) and the
    provider's pong reaches the client: the sidecar answers neither itself."""
    seen = []

    async def provider(reader, writer):
        writer.write(switching_protocols(await reader.readuntil(b"\r\n\r\n")))
        seen.append(await short_frame(reader))
        writer.write(bytes([0x8A, len(seen[0][2])]) + seen[0][2])
        seen.append(await short_frame(reader))
        writer.write(bytes([0x88, len(seen[1][2])]) + seen[1][2])   # answered: no close timeout
        await reader.read()

    async def body():
        server = await asyncio.start_server(provider, "127.0.0.1", upstream_ports["raw"])
        try:
            async with connect(sidecar.url(provider="raw"), additional_headers=sidecar.auth()) as ws:
                await asyncio.wait_for(await ws.ping(b"are you there"), 5)
        finally:
            server.close()
    run(body())
    assert seen == [(0x89, 0x80, b"are you there"), (0x88, 0x80, (1000).to_bytes(2, "big"))]


def test_frames_reach_each_side_byte_for_byte(sidecar, upstream_ports):
    """Frames are forwarded verbatim: the provider reads the client's frames as the
    client wrote them (right behind its request), masking keys included: never
    unmasked or re-masked; the client reads the provider's as the provider wrote them
    (right behind its 101)."""
    def frames(mask: bool) -> bytes:
        parts = [Frame(Opcode.TEXT, b'{"type":"x"}'), Frame(Opcode.BINARY, os.urandom(126)),
                 Frame(Opcode.BINARY, os.urandom(70000), fin=False), Frame(Opcode.PING, b"p"),
                 Frame(Opcode.CONT, b""), Frame(Opcode.BINARY, b"")]
        return b"".join(f.serialize(mask=mask) for f in parts)
    to_provider, to_client = frames(mask=True), frames(mask=False)

    async def body():
        seen = asyncio.get_running_loop().create_future()

        async def provider(reader, writer):
            writer.write(switching_protocols(await reader.readuntil(b"\r\n\r\n")) + to_client)
            seen.set_result(await reader.readexactly(len(to_provider)))
            await reader.read()
        async with await asyncio.start_server(provider, "127.0.0.1", upstream_ports["raw"]):
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
            writer.write(request("/v1/realtime/connect?model=m&provider=raw", key=sidecar.keys.plain["good"])
                         + to_provider)
            await reader.readuntil(b"\r\n\r\n")
            got = await asyncio.wait_for(reader.readexactly(len(to_client)), 10)
            provider_got = await asyncio.wait_for(seen, 10)
            writer.close()
            return got, provider_got
    assert run(body()) == (to_client, to_provider)


def test_normal_close_is_relayed_both_ways(sidecar):
    async def body():
        async with connect_to(sidecar) as ws:
            await ws.recv()
            await ws.close(1000, "bye")
        assert ws.close_code == 1000
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
    run(body())


def test_both_paths_are_served(sidecar):
    async def body():
        url = sidecar.url(path="/v1/realtime", provider=None)
        async with connect(url, additional_headers=sidecar.auth()) as ws:
            assert '"session.created"' in await ws.recv()
    run(body())
