"""The client leg's WebSocket protocol against RFC 6455, over real sockets: what a
client writes by hand (frames split anywhere, masks of zeros, frames after its close)
and what the provider and the client get."""

import asyncio

import pytest
from conftest import SidecarProcess, raw_upstream_sidecar, run, standard_keys
from test_bad_input import BAD_CLIENT_FRAMES, close_frame_of, masked, session
from test_faults import with_upstream


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A sidecar whose provider `raw` is the test's own hand-written upstream."""
    proc = raw_upstream_sidecar(str(tmp_path_factory.mktemp("clientproto")), "close_timeout_seconds = 1")
    try:
        yield proc
        assert proc.proc.poll() is None and "Traceback" not in proc.output()
    finally:
        proc.stop()


@pytest.mark.parametrize("after", [
    masked(0xC1, b"x"),                         # RSV1
    masked(0x82, b"", bytes([0x80 | 127]) + (1 << 40).to_bytes(8, "big")),   # over the limit
    bytes([0x82, 1]) + b"x",                    # unmasked
    masked(0x88, b"\x03"),                      # a second close, itself invalid
], ids=["rsv", "too-big", "unmasked", "bad-close"])
def test_what_a_client_sends_after_its_close_is_discarded(raw, after):
    """RFC 6455 1.4: after a close frame a peer discards what it receives. A client's
    close followed in the same write by a frame the relay would refuse got 1002 (the
    frame's violation) in place of the provider's answer to its close."""
    def answer(transport, data):
        if data[:1] == b"\x88" and not transport.is_closing():
            transport.write(b"\x88\x02\x03\xe8")

    async def client(reader, writer, events):
        events["on_data"] = answer
        writer.write(masked(0x88, (1000).to_bytes(2, "big") + b"done") + after)
        return await asyncio.wait_for(reader.read(), 5)     # until the sidecar closes
    data, events = with_upstream(raw, lambda t: None, client)
    assert data == b"\x88\x02\x03\xe8"
    assert bytes(events["data"]) == masked(0x88, (1000).to_bytes(2, "big") + b"done")


def test_what_a_provider_sends_after_its_close_is_discarded(raw):
    """The same the other way: the client's answer to the provider's close reaches the
    provider, though the provider wrote a bad frame behind its close (it got 1002)."""
    def act(transport):
        transport.write(b"\x88\x04\x03\xe8hi" + bytes([0xC1, 0]))

    async def client(reader, writer, events):
        assert await close_frame_of(reader) == (1000, "hi")
        writer.write(masked(0x88, (1000).to_bytes(2, "big") + b"ok"))
        await asyncio.wait_for(reader.read(), 5)            # the sidecar closes
        for _ in range(100):                                # and lets go of the provider
            if "lost" in events:
                break
            await asyncio.sleep(0.05)
    _, events = with_upstream(raw, act, client)
    assert bytes(events["data"]) == masked(0x88, (1000).to_bytes(2, "big") + b"ok")


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A sidecar that holds the client's first message (Gemini's setup) before it opens
    the provider (which is never reached here)."""
    proc = SidecarProcess(str(tmp_path_factory.mktemp("held")),
                          '[providers.gemini]\nurl = "ws://127.0.0.1:9/g?key={secret}"\n'
                          'secret_env = "PROVIDER_KEY"\n', standard_keys(),
                          limits="max_message_bytes = 1024\nfirst_message_bytes = 1024\n"
                                 "close_timeout_seconds = 1").start()
    try:
        yield proc
        assert proc.proc.poll() is None and "Traceback" not in proc.output()
    finally:
        proc.stop()


def held_close(held, frames: bytes) -> tuple[int, str]:
    """The close a held session's client gets for `frames`, sent before its first message."""
    async def body():
        reader, writer = await session(held.port, held.keys.plain["good"],
                                       "/v1/realtime/connect?provider=gemini")
        writer.write(frames)
        try:
            return await close_frame_of(reader)
        finally:
            writer.close()
    return run(body())


HELD_BAD = BAD_CLIENT_FRAMES + [
    (masked(0x89, b"", bytes([0x80 | 127]) + (1 << 40).to_bytes(8, "big")), 1002,
     "client: control frame payload over 125 bytes"),
]


@pytest.mark.parametrize("frames, code, reason", HELD_BAD, ids=[reason for _, _, reason in HELD_BAD])
def test_a_held_first_message_is_judged_as_the_relay_judges_every_frame(held, frames, code, reason):
    """The frames before a held first message were judged by websockets' parser: its
    own reasons without the side (`incorrect masking`), and 1009 where the relay and
    the docs say 1002 (a 64-bit length with the top bit set, a ping announcing 1 TiB)."""
    assert held_close(held, frames) == (code, reason)


def test_a_close_inside_a_held_first_message_is_a_close(held):
    """RFC 6455 5.4: a control frame, a close too, may come between the fragments of a
    message. websockets' parser fails a close there (1002 `incomplete fragmented
    message`); the relay drops the unfinished message and takes the close."""
    frames = masked(0x01, b'{"setup": ') + masked(0x88, (1000).to_bytes(2, "big"))
    assert held_close(held, frames) == (1000, "closed before its first message")


def test_a_sidecar_close_that_answers_the_clients_close_is_a_normal_closure(tmp_path):
    """The client closes without a code (the documented client's disconnect()); the
    provider never answers, and the session goes idle. The sidecar's close then answers
    the client's: 1000, as when the provider's answer never comes (README), not the
    idle timeout's 1001, on which the documented client reconnects, undoing its
    disconnect (a drain's 1001, a revoked key's 4001 likewise)."""
    proc = raw_upstream_sidecar(str(tmp_path), "idle_timeout_seconds = 1\nclose_timeout_seconds = 30")
    try:
        async def client(reader, writer, events):
            writer.write(masked(0x88, b""))
            return await asyncio.wait_for(reader.read(), 10)     # until the sidecar closes
        data, events = with_upstream(proc, lambda t: None, client)
        assert data == b"\x88\x0e" + (1000).to_bytes(2, "big") + b"idle timeout"
    finally:
        proc.stop()
