"""What a relayed session keeps of the protocols before it. uvloop's `set_protocol`
keeps the new protocol's `data_received`, `get_buffer` and `buffer_updated` as it
finds them (and the old `data_received` when the new protocol has none): anything
bound there lives as long as the session, and idle sessions are held by the
thousand. A leg's `buffer_updated` is the leg itself, so nothing is bound. The
relay runs in this process between a websockets client and a hand-written
upstream, all over loopback (test_relay_notice's session)."""

import asyncio
import gc
import types

from conftest import HttpHead, run
from test_relay_notice import _session


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
