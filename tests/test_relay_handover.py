"""What a relayed session keeps of the protocols before it. uvloop's `set_protocol`
keeps the new protocol's `data_received`, `get_buffer` and `buffer_updated` as it
finds them (and the old `data_received` when the new protocol has none): anything
bound there lives as long as the session, and idle sessions are held by the
thousand. A leg's `buffer_updated` is the leg itself, so nothing is bound. The
relay runs in this process between a websockets client and a hand-written
upstream, all over loopback (test_relay_notice's session).

And what a TLS connection leaves to the cyclic GC when it ends, before or after the
handover: nothing (the sidecar runs that GC rarely)."""

import asyncio
import base64
import gc
import os
import types

from conftest import HttpHead, run, switching_protocols
from test_relay_notice import _session
from test_relay_tls import _echo, pki  # noqa: F401  (pki: a fixture)
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from conduit_sidecar import _relay, tlsleg


def _heads() -> int:
    gc.collect()
    return sum(isinstance(o, HttpHead) for o in gc.get_objects())


def test_handshake_protocols_die_and_no_leg_method_is_bound():
    async def body():
        before = _heads()                   # other tests' sessions, if any are left
        relay, ws, upstream = await _session()
        upstream.write(bytes([0x81, 5]) + b"hello")
        assert await ws.recv() == "hello"
        await ws.send(b"ping")
        await asyncio.sleep(0.1)            # the relay has read from both sockets
        heads = _heads() - before
        legs = (relay.client, relay.upstream)
        bound = sorted(o.__func__.__name__ for o in gc.get_objects()
                       if isinstance(o, types.MethodType) and any(o.__self__ is leg for leg in legs))
        relay.abort()
        return heads, bound

    heads, bound = run(body())
    assert heads == 0, "a handshake protocol outlived the handover"
    assert bound == []


def _left_to_the_gc(run_it, kinds) -> list[str]:
    """The names of `kinds` among what the cyclic GC would free after `run_it()`,
    which runs with the GC off (it would otherwise free them along the way)."""
    gc.collect()
    gc.disable()
    try:
        run_it()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return sorted({type(o).__qualname__ for o in gc.garbage if kinds(o)})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_tls_connection_that_ends_before_the_handover_is_freed_without_the_cyclic_gc(pki):
    """A wss listener's connection refused before any session (a bad request, a
    timeout) never reaches the relay: its TLSStream and handshake protocol refer to
    each other. They must part when the connection ends, or every such connection's
    TLS state waits for the cyclic GC: memory a peer without a key could pile up."""
    async def body(server_ctx, client_ctx):
        loop = asyncio.get_running_loop()
        lost = loop.create_future()

        class Head(HttpHead):
            def connection_lost(self, exc):
                super().connection_lost(exc)
                lost.set_result(None)

        server = await loop.create_server(
            lambda: tlsleg.TLSStream(server_ctx, Head(), server_side=True), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                       server_hostname="127.0.0.1")
        writer.write(b"GET /nowhere HTTP/1.1\r\n")
        await writer.drain()
        writer.close()
        await asyncio.wait_for(lost, 5)
        server.close()

    left = _left_to_the_gc(lambda: run(body(*pki)), lambda o: isinstance(o, (tlsleg.TLSStream, HttpHead)))
    assert left == []


def test_a_session_on_uvloops_tls_transport_is_freed_without_the_cyclic_gc(pki):
    """The fallback TLS path (a build without OpenSSL's headers): the provider leg is
    uvloop's SSL transport, which keeps its protocol, the leg, after the end. Once the
    session is over, nothing of it may be left to the cyclic GC, which runs rarely in
    the sidecar (gc.set_threshold(50_000, ...)): each session's TLS buffers would
    wait there, tens of KiB per session."""
    async def body(server_ctx, client_ctx):
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        async def front(head_proto):
            head = await head_proto.done
            raw, up = await loop.create_connection(HttpHead, "127.0.0.1", up_port)
            upstream = await loop.start_tls(raw, up, client_ctx, server_hostname="127.0.0.1")
            up.transport = upstream
            upstream.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                           b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n\r\n")
            response = await up.done
            client = head_proto.transport
            client.write(switching_protocols(head))
            relay = _relay.Relay(loop, 1 << 30, 2.0, ended.set_result)
            relay.start(client, upstream, b"", response.split(b"\r\n\r\n", 1)[1])
            client.resume_reading()
            upstream.resume_reading()

        def accept():
            head = HttpHead()
            loop.create_task(front(head))
            return head

        async with serve(_echo, "127.0.0.1", 0, ssl=server_ctx, compression=None) as up_server:
            up_port = up_server.sockets[0].getsockname()[1]
            server = await loop.create_server(accept, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}/", compression=None) as ws:
                await ws.send("over TLS")
                assert await ws.recv() == "over TLS"
            await asyncio.wait_for(ended, 5)
            await asyncio.sleep(0.2)        # the provider leg's close_notify and TCP close
            server.close()

    left = _left_to_the_gc(lambda: run(body(*pki)),
                           lambda o: type(o).__module__ == "_relay"
                           or type(o).__qualname__ in ("SSLProtocol", "_SSLProtocolTransport"))
    assert left == []
