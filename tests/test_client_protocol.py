"""The client leg's WebSocket protocol against RFC 6455, over real sockets: what a
client writes by hand (frames split anywhere, masks of zeros, frames after its close)
and what the provider and the client get."""

import asyncio
import os
import random
import socket
import ssl

import pytest
from conftest import (NO_CIRCUIT, SidecarProcess, held_port, raw_upstream_sidecar, run, self_signed_tls,
                      standard_keys)
from reference_parser import scan
from test_bad_input import BAD_CLIENT_FRAMES, close_frame_of, http_answer, masked, request, session
from test_faults import RawUpstream, answer_the_close, with_upstream

LIMIT = 1000    # max_message_bytes of the `raw` sidecar


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A sidecar whose provider `raw` is the test's own hand-written upstream, with a
    wss listener beside the plain one."""
    root = tmp_path_factory.mktemp("clientproto")
    port, tls_port = held_port(), held_port()
    tls = self_signed_tls(tls_port, root / "public" / "ca.pem", root / "private")
    proc = SidecarProcess(str(root), f'[providers.raw]\nurl = "ws://127.0.0.1:{port}/"\n', standard_keys(),
                          limits=f"close_timeout_seconds = 1\nmax_message_bytes = {LIMIT}", extra=tls + NO_CIRCUIT).start()
    proc.upstream_port, proc.tls_port, proc.ca_out = port, tls_port, str(root / "public" / "ca.pem")
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
        await answer_the_close(reader, writer, events, "hi")
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


def test_a_client_that_closes_before_its_first_message_is_let_go_at_once(tmp_path):
    """Its close frame was read by the held reader, and the sidecar's answer
    then waited close_timeout_seconds for a close it already had: the connection, and a
    pending slot, were held for that long (5 s by default, 30 here)."""
    proc = SidecarProcess(str(tmp_path), '[providers.gemini]\nurl = "ws://127.0.0.1:9/g?key={secret}"\n'
                          'secret_env = "PROVIDER_KEY"\n', standard_keys(),
                          limits="close_timeout_seconds = 30").start()

    async def body():
        reader, writer = await session(proc.port, proc.keys.plain["good"], "/v1/realtime/connect?provider=gemini")
        writer.write(masked(0x88, (1000).to_bytes(2, "big")))
        try:
            close = await close_frame_of(reader)
            return close, await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
    try:
        assert run(body()) == ((1000, "closed before its first message"), b"")
    finally:
        proc.stop()


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



@pytest.mark.parametrize("version", ["8", "13, 8", None])
def test_a_version_not_served_is_answered_with_the_one_served(raw, version):
    """RFC 6455 4.4: a server that does not speak the client's version answers with
    an error and a Sec-WebSocket-Version header naming the versions it does speak, so
    that a client may retry with one of them. The 400 named none."""
    status, headers, _ = http_answer(raw.port, request(headers={"Sec-WebSocket-Version": version},
                                                       key=raw.keys.plain["good"]))
    assert status == 400 and ("sec-websocket-version", "13") in headers

# -- differential: random frame streams against the reference parser ---------------------

def encode(opcode: int, payload: bytes, masked: bool, fin: bool = True, rsv: int = 0,
           key: bytes | None = None, form: str = "min") -> bytes:
    """A frame; `form` "16" or "64" writes a short length in a longer form (RFC 6455
    asks senders for the shortest; receivers take any)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if masked else 0
    if form == "min" and n < 126:
        head += bytes([bit | n])
    elif form in ("min", "16") and n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4) if key is None else key
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def cut(data: bytes, at: list[int]) -> list[bytes]:
    """`data` in pieces, cut at the offsets `at` (empty pieces too)."""
    at = sorted(at)
    return [data[a:b] for a, b in zip([0, *at], [*at, len(data)], strict=True)]


def frame_stream(rng: random.Random, masked: bool, variant: int) -> bytes:
    """Messages of 1-4 fragments (empty ones too; text cut inside its characters), pings
    and pongs between fragments, length forms and masks of zeros; among them, by
    `variant` (modulo their number), nothing more, a frame the relay must refuse, or a close with
    a bad frame after it; always a close last."""
    def one(opcode, payload, fin=True, **kw):
        key = b"\0\0\0\0" if rng.random() < 0.3 else None
        return encode(opcode, payload, masked, fin, key=key, **kw)
    frames = []
    for _ in range(rng.randint(1, 6)):
        text = rng.random() < 0.5
        if text:
            payload = ("é€😀" * rng.randint(0, 40)).encode()
        else:
            payload = os.urandom(rng.choice([0, 1, 125, 126, 300]))
        parts = cut(payload, [rng.randint(0, len(payload)) for _ in range(rng.randint(0, 3))])
        for i, part in enumerate(parts):
            while rng.random() < 0.3:
                frames.append(one(rng.choice([9, 10]), os.urandom(rng.choice([0, 1, 125]))))
            frames.append(one((1 if text else 2) if i == 0 else 0, part, i == len(parts) - 1,
                              form=rng.choice(["min", "min", "16", "64"])))
    variants = [None, None,
                one(2, b"x", rsv=0x40), one(3, b"x"), encode(2, b"x", not masked),
                     one(9, b"p" * 126), one(10, b"p", False), one(0, b"c"),
                one(1, b"a", False) + one(2, b"b"), one(2, b"b" * (LIMIT + 1)),
                one(8, b"\x03"), one(8, (1005).to_bytes(2, "big")), one(8, b"\x03\xe8\xc3\x28"),
                one(8, (4000).to_bytes(2, "big") + b"first") + one(2, b"x", rsv=0x40)]
    bad = variants[variant % len(variants)]
    if bad is not None:
        frames.insert(rng.randint(0, len(frames)), bad)
    return b"".join(frames) + one(8, (1000).to_bytes(2, "big") + b"last")


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, unmasked payload) of each whole frame in `data`."""
    out, pos = [], 0
    while pos + 2 <= len(data):
        n, at = data[pos + 1] & 0x7F, pos + 2
        if n >= 126:
            width = 2 if n == 126 else 8
            n, at = int.from_bytes(data[at:at + width], "big"), at + width
        key = data[at:at + 4] if data[pos + 1] & 0x80 else b"\0\0\0\0"
        at += 4 if data[pos + 1] & 0x80 else 0
        if at + n > len(data):
            break
        out.append((data[pos], bytes(b ^ key[i & 3] for i, b in enumerate(data[at:at + n]))))
        pos = at + n
    return out


def answer_closes(events: dict, masked: bool):
    """An on_data for RawUpstream (or the client): answer the first close with its code."""
    def on_data(transport, data):
        closes = [p for b0, p in frames_of(bytes(data)) if b0 == 0x88]
        if closes and not events.get("answered"):
            events["answered"] = True
            transport.write(encode(8, closes[0][:2], masked))
    return on_data


async def differential(raw, seed: int, tls: bool, client_sends: bool) -> None:
    rng = random.Random(seed)
    data = frame_stream(rng, client_sends, seed)
    pieces = cut(data, rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 20))))
    ref = scan(data, client_sends, LIMIT)
    events: dict = {}

    async def provider_writes(transport):
        for piece in pieces:
            if transport.is_closing():  # the sidecar let go of a violator
                break
            transport.write(piece)
            await asyncio.sleep(0)      # each piece its own segment, often its own read

    def act(transport):
        if not client_sends:
            asyncio.ensure_future(provider_writes(transport))
    loop = asyncio.get_running_loop()
    async with await loop.create_server(lambda: RawUpstream(act, events), "127.0.0.1", raw.upstream_port):
        if client_sends:
            events["on_data"] = answer_closes(events, False)
        context = ssl.create_default_context(cafile=raw.ca_out) if tls else None
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", raw.tls_port if tls else raw.port, ssl=context)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(request("/v1/realtime/connect?provider=raw&model=m", key=raw.keys.plain["good"]))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        if client_sends:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
        got, answered = b"", False
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                got += chunk
                closes = [p for b0, p in frames_of(got) if b0 == 0x88]
                if closes and not answered and not client_sends:
                    answered = True
                    writer.write(encode(8, closes[0][:2], True))
        except ConnectionResetError:    # a violator's socket may be reset after its close
            pass
        writer.close()
        for _ in range(100):
            if "lost" in events:
                break
            await asyncio.sleep(0.05)
    upstream = bytes(events.get("data", b""))
    sent, received = (upstream, got) if client_sends else (got, upstream)
    code, reason = ref.verdict
    side = "client" if client_sends else "upstream"
    if code:
        # The frames before the bad one, whole, then the sidecar's close to each side.
        assert sent.startswith(ref.output), seed
        why = f"{side}: {reason}".encode()
        to_other = code if client_sends or code == 1009 else 1014
        assert frames_of(sent[len(ref.output):]) == [(0x88, to_other.to_bytes(2, "big") + why)]
        assert frames_of(received)[-1:] == [(0x88, code.to_bytes(2, "big") + why)]
    else:
        # Every byte up to the first close, verbatim; its answer back, nothing after.
        assert sent == ref.output, seed
        first_close = next(p for b0, p in frames_of(ref.output) if b0 == 0x88)
        assert frames_of(received) == [(0x88, first_close[:2])], seed


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
@pytest.mark.parametrize("client_sends", [True, False], ids=["client-to-provider", "provider-to-client"])
def test_random_frame_streams_are_relayed_as_the_reference_parser_says(raw, tls, client_sends):
    """Whatever the frames and however they are cut across TCP writes: the receiving
    side gets every byte the reference parser accepts, verbatim, up to the first close
    or the first frame to refuse; then the close its verdict names (the provider's
    violation is 1014 to the client, 1009 excepted), and the answer to a close is the
    other side's."""
    async def body():
        for seed in range(28):          # each variant of frame_stream twice
            await differential(raw, seed, tls, client_sends)
    run(body(), timeout=120)
