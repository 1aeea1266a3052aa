"""The close codes the sidecar sends, and upstream failures, over real sockets."""

import asyncio
import base64
import os
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import (NO_CIRCUIT, PROVIDER_SECRET, SidecarProcess, SlowUpstream, held_port,
                      raw_upstream_sidecar, run, short_frame, standard_keys, switching_protocols)
from test_bad_input import session_ends
from test_operations import ended, scrape, value


async def close_of(url, headers=None, subprotocols=None):
    """Connect, then wait for the close; returns (code, reason)."""
    async with connect(url, additional_headers=headers or {}, subprotocols=subprotocols,
                       open_timeout=10) as ws:
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code, exc.rcvd.reason


@pytest.mark.parametrize("key_id, reason", [
    (None, "missing key"), ("wrong", "unknown key"),
    ("disabled", "key disabled"), ("expired", "key expired")])
def test_bad_keys_get_4001(sidecar, key_id, reason):
    headers = {} if key_id is None else (
        {"Authorization": "Bearer condt_not_a_key"} if key_id == "wrong" else sidecar.auth(key_id))
    assert run(close_of(sidecar.url(), headers)) == (4001, reason)


def test_two_different_keys_get_4001_saying_so(sidecar):
    """Two `Authorization` headers with different keys (one a proxy added, say): no key
    is picked, as before, and the reason says so; it said `missing key`, which sends
    the user looking for a header that is there."""
    headers = [("Authorization", sidecar.auth()["Authorization"]),
               ("Authorization", "Bearer condt_another")]
    assert run(close_of(sidecar.url(), headers)) == (4001, "two different keys")


def test_future_expiry_is_fine(sidecar):
    async def body():
        async with connect(sidecar.url(), additional_headers=sidecar.auth("future")) as ws:
            assert "session.created" in await ws.recv()
    run(body())


def test_disallowed_model_and_provider_get_4003(sidecar):
    code, reason = run(close_of(sidecar.url(), sidecar.auth("restricted")))
    assert code == 4003 and "provider 'mock' not allowed" in reason
    assert run(close_of(sidecar.url(), sidecar.auth("models-only"))) == (
        4003, "model 'mock-realtime' not allowed for this key")
    # The log line names the key refused (its id: never the key itself).
    assert {(line["key_id"], line["code"]) for line in sidecar.wait_lines(
        lambda line: line.get("event") == "rejected" and line["reason"].startswith("model 'mock-realtime'"))
            } == {("models-only", 4003)}


def test_allowed_models_match_whole_or_up_to_the_star(sidecar):
    """A pattern without `*` is the whole model, not its prefix; with one, every
    character before the `*` counts."""
    async def body():
        async with connect(sidecar.url(), additional_headers=sidecar.auth("one-model")) as ws:
            assert "session.created" in await ws.recv()
    run(body())
    assert run(close_of(sidecar.url(model="mock-realtime-large"), sidecar.auth("one-model"))) == (
        4003, "model 'mock-realtime-large' not allowed for this key")
    assert run(close_of(sidecar.url(model="gpt-realtimX"), sidecar.auth("models-only"))) == (
        4003, "model 'gpt-realtimX' not allowed for this key")


def test_unknown_provider_and_unrouted_model_get_4004(sidecar):
    assert run(close_of(sidecar.url(provider="nope"), sidecar.auth())) == (
        4004, "unknown provider 'nope'")
    assert run(close_of(sidecar.url(model="whisper-1", provider=None), sidecar.auth())) == (
        4004, "no provider serves model 'whisper-1'")


def test_model_routes_pick_the_provider(sidecar):
    async def body():
        async with connect(sidecar.url(provider=None), additional_headers=sidecar.auth()) as ws:
            assert "session.created" in await ws.recv()
    run(body())


def test_per_key_limit_gets_4029(sidecar):
    async def body():
        async with connect(sidecar.url(), additional_headers=sidecar.auth("limited")) as first:
            await first.recv()
            code, reason = await close_of(sidecar.url(), sidecar.auth("limited"))
            assert code == 4029 and "limit of 1" in reason
        # The slot frees when the session ends.
        await asyncio.sleep(0.2)
        async with connect(sidecar.url(), additional_headers=sidecar.auth("limited")) as again:
            assert "session.created" in await again.recv()
    run(body())


def test_bytes_written_with_the_101_reach_the_client(sidecar, upstream_ports):
    """The provider writes its 101 and a first frame in one TCP write."""
    async def body():
        async def handle(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            first = b'{"type":"session.created"}'
            writer.write(switching_protocols(head) + bytes([0x81, len(first)]) + first
                         + bytes([0x82, 3]) + b"abc")
            await writer.drain()
            await reader.read(1 << 16)
            writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", upstream_ports["raw"])
        async with server:
            async with connect(sidecar.url(provider="raw"), additional_headers=sidecar.auth()) as ws:
                assert await ws.recv() == '{"type":"session.created"}'
                assert await ws.recv() == b"abc"
    run(body())


def test_upstream_refusing_with_401_gives_1014(sidecar, upstream_ports):
    async def body():
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\nunauthorized")
            await writer.drain()
            writer.close()
        async with await asyncio.start_server(handle, "127.0.0.1", upstream_ports["refuse"]):
            return await close_of(sidecar.url(provider="refuse"), sidecar.auth())
    assert run(body()) == (1014, "upstream refused: HTTP 401")


@pytest.mark.parametrize("header, what", [
    (b"Sec-WebSocket-Extensions: permessage-deflate", "no extensions supported"),
    (b"Sec-WebSocket-Protocol: realtime", "no subprotocols supported")])
def test_an_upstream_selecting_what_was_not_offered_gives_1014(tmp_path, header, what):
    """No compression extension is negotiated on either leg: a provider whose 101
    selects one (or a subprotocol the client did not offer) is refused, its frames
    would not be the client's. (A sidecar of its own: the shared one's deployments
    would count the failures.)"""
    sidecar = raw_upstream_sidecar(str(tmp_path), "")

    async def body():
        async def handle(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(switching_protocols(head)[:-2] + header + b"\r\n\r\n")
            await writer.drain()
            await reader.read()
            writer.close()
        async with await asyncio.start_server(handle, "127.0.0.1", sidecar.upstream_port):
            return await close_of(sidecar.url(provider="raw"), sidecar.auth())
    try:
        assert run(body()) == (1014, f"upstream handshake invalid: {what}")
    finally:
        sidecar.stop()


def test_upstream_never_answering_gives_1014_within_the_timeout(sidecar, upstream_ports):
    """The provider accepts TCP and would send its 101 only 6 s after the request:
    twice the configured connect timeout (3 s), under the 10 s default. The sidecar
    lets go of it first, and the 101 never goes out."""
    async def body():
        async with SlowUpstream(upstream_ports["blackhole"], delay=6) as up:
            result = await asyncio.wait_for(close_of(sidecar.url(provider="blackhole"), sidecar.auth()), 10)
            await asyncio.wait_for(up.released.wait(), 5)
            return result, up.answered
    (code, reason), answered = run(body())
    assert code == 1014 and reason == "upstream timed out (WebSocket handshake)"
    assert not answered


def test_upstream_down_gives_1014(sidecar):
    """And its lines, the failed attempt's and the rejection's, name the session: they
    named none, so a session's lines could not be joined."""
    before = len(sidecar.log_lines())
    assert run(close_of(sidecar.url(provider="down"), sidecar.auth())) == (
        1014, "upstream refused the connection")
    deadline = time.monotonic() + 5
    while not (rejected := [line for line in sidecar.log_lines()[before:] if line.get("event") == "rejected"]):
        assert time.monotonic() < deadline, "no rejected line"
        time.sleep(0.05)
    attempt, = [line for line in sidecar.log_lines()[before:] if line.get("event") == "upstream_attempt"]
    assert rejected[0]["key_id"] == "good" and rejected[0]["session_id"].startswith("s")
    assert attempt["session_id"] == rejected[0]["session_id"]


def test_a_session_its_provider_failed_frees_its_keys_slot(sidecar):
    """The `limited` key has one connection: a session its provider refused (1014) gives
    it back (nothing tested that it did: without it the next session got 4029)."""
    assert run(close_of(sidecar.url(provider="down"), sidecar.auth("limited"))) == (
        1014, "upstream refused the connection")

    async def body():
        async with connect(sidecar.url(), additional_headers=sidecar.auth("limited")) as ws:
            assert "session.created" in await ws.recv()
    run(body())


def test_provider_close_code_and_reason_reach_the_client(sidecar, upstream_ports):
    async def body():
        from websockets.asyncio.server import serve

        async def handler(ws):
            await ws.recv()
            await ws.close(4000, "invalid_request_error: bad event")
        async with serve(handler, "127.0.0.1", upstream_ports["closer"]):
            async with connect(sidecar.url(provider="closer"), additional_headers=sidecar.auth()) as ws:
                await ws.send("hello")
                with pytest.raises(ConnectionClosed) as exc:
                    await ws.recv()
                return exc.value.rcvd.code, exc.value.rcvd.reason
    closes = lambda: value(scrape(sidecar), "conduit_closes_total", side="upstream", code="4000")  # noqa: E731
    before = closes()
    assert run(body()) == (4000, "invalid_request_error: bad event")
    # A provider's code is its own label value (a client's 3000-4999 are two: 3xxx, 4xxx).
    deadline = time.monotonic() + 5
    while closes() != before + 1:
        assert time.monotonic() < deadline, f"upstream 4000 closes: {closes()}, was {before}"
        time.sleep(0.05)


@pytest.mark.parametrize("closer", ["client", "provider"])
@pytest.mark.parametrize("secret", ["provider key", "provider key cut", "virtual key"])
def test_a_secret_in_a_close_reason_is_neither_passed_on_nor_logged(sidecar, upstream_ports, closer, secret):
    """A provider that quotes the key it was sent ("invalid key sk-...", whole or cut
    by the 123-byte limit of a close reason), or a client that puts its virtual key in
    its close reason: the other peer and the session_end line get the reason with the
    secret as `***`, the rest of it as sent."""
    quoted = {"provider key": PROVIDER_SECRET, "provider key cut": PROVIDER_SECRET[:12],
              "virtual key": sidecar.keys.plain["good"]}[secret]

    async def body():
        from websockets.asyncio.server import serve
        heard = asyncio.get_running_loop().create_future()

        async def handler(ws):
            if closer == "provider":
                await ws.close(4000, f"invalid key {quoted}.")
            else:
                await ws.wait_closed()
                heard.set_result(ws.protocol.close_rcvd)
        async with serve(handler, "127.0.0.1", upstream_ports["raw"]):
            async with connect(sidecar.url(provider="raw"), additional_headers=sidecar.auth()) as ws:
                if closer == "client":
                    await ws.close(4000, f"invalid key {quoted}.")
                    return await asyncio.wait_for(heard, 5)
                with pytest.raises(ConnectionClosed) as exc:
                    await ws.recv()
                return exc.value.rcvd
    ends = len(session_ends(sidecar))
    rcvd = run(body())
    assert (rcvd.code, rcvd.reason) == (4000, "invalid key ***.")
    assert ended(sidecar, ends)[0]["close_reason"] == "invalid key ***."
    assert quoted not in sidecar.output()


@pytest.fixture(scope="module")
def credentialed(tmp_path_factory):
    """A sidecar whose providers carry credentials besides a `{secret}` header: one
    typed into the config as a header (`lit`) or as the URL's password (`pass`), a
    `{secret}` short of redact's 8-character runs (`short`), and a `{secret}` as the
    URL's password (`secretpass`): websockets sends the user information as Basic."""
    port = held_port()
    providers = f"""
        [providers.lit]
        url = "ws://127.0.0.1:{port}/"
        headers = {{ X-Api-Key = "Lit3ralHdrCred9" }}

        [providers.pass]
        url = "ws://svc:Lit3ralPassw0rd@127.0.0.1:{port}/"

        [providers.short]
        url = "ws://127.0.0.1:{port}/"
        headers = {{ X-Api-Key = "{{secret}}" }}
        secret_env = "SHORT_KEY"

        [providers.secretpass]
        url = "ws://svc:{{secret}}@127.0.0.1:{port}/"
        secret_env = "PROVIDER_KEY"
        """
    proc = SidecarProcess(str(tmp_path_factory.mktemp("credentialed")), providers, standard_keys(),
                          extra=NO_CIRCUIT, env={"SHORT_KEY": "S7x!q2"}).start()
    proc.upstream_port = port
    yield proc
    proc.stop()


@pytest.mark.parametrize("provider, quoted", [
    ("lit", "Lit3ralHdrCred9"),
    ("pass", "Lit3ralPassw0rd"),
    ("pass", "Basic " + base64.b64encode(b"svc:Lit3ralPassw0rd").decode()),
    ("short", "S7x!q2"),
    ("secretpass", "Basic " + base64.b64encode(f"svc:{PROVIDER_SECRET}".encode()).decode()[:40]),
])
def test_a_credential_of_the_config_in_a_providers_close_reason_is_redacted(credentialed, provider, quoted):
    """A provider quoting back a credential its upgrade request carried, one that is
    not a `{secret}` of 8 characters or more (the URL's password, the Basic header
    websockets makes of it, a header value typed into the config, a short secret):
    the client and the session_end line get it as `***`, as they get a secret's."""

    async def handler(ws):
        await ws.close(4000, f"invalid key {quoted}.")

    async def body():
        from websockets.asyncio.server import serve
        async with serve(handler, "127.0.0.1", credentialed.upstream_port):
            async with connect(credentialed.url(provider=provider),
                               additional_headers=credentialed.auth()) as ws:
                with pytest.raises(ConnectionClosed) as exc:
                    await ws.recv()
                return exc.value.rcvd
    told = "invalid key " + " ".join([*quoted.split()[:-1], "***."])  # a scheme stays
    ends = len(session_ends(credentialed))
    rcvd = run(body())
    assert (rcvd.code, rcvd.reason) == (4000, told)
    assert ended(credentialed, ends)[0]["close_reason"] == told
    assert quoted.split()[-1] not in credentialed.output()


@pytest.mark.parametrize("closer", ["provider", "client"])
def test_a_close_of_the_sidecars_making_is_counted_as_sent(sidecar, upstream_ports, closer):
    """A provider's close that the sidecar sends on as its own, its length in the
    8-byte form (RFC 6455 5.2 lets receivers take any): its reason quoting the key (the
    client reads `***`), or its codeless answer to the client's close (1000). The bytes
    counted (session_end, conduit_bytes_total) are those sent, not the provider's
    10-byte header with the new payload's length."""
    payload = (4000).to_bytes(2, "big") + f"invalid key {PROVIDER_SECRET}.".encode()
    if closer == "client":
        payload = b""

    async def provider(reader, writer):
        writer.write(switching_protocols(await reader.readuntil(b"\r\n\r\n")))
        if closer == "client":
            await short_frame(reader)
        writer.write(bytes([0x88, 127]) + len(payload).to_bytes(8, "big") + payload)
        await reader.read()     # until the sidecar's end
        writer.close()
        done.set_result(None)

    async def body():
        nonlocal done
        done = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(provider, "127.0.0.1", upstream_ports["raw"])
        async with server:
            async with connect(sidecar.url(provider="raw"), additional_headers=sidecar.auth()) as ws:
                if closer == "client":
                    await ws.close()
                    await done
                    return ws.protocol.close_rcvd
                with pytest.raises(ConnectionClosed) as exc:
                    await ws.recv()
            await done
            return exc.value.rcvd
    done = None
    ends = len(session_ends(sidecar))
    before = value(scrape(sidecar), "conduit_bytes_total", direction="upstream_to_client")
    payload_before = close_payload(sidecar)
    rcvd = run(body())
    told = {"provider": (4000, "invalid key ***."), "client": (1000, "")}[closer]
    assert (rcvd.code, rcvd.reason) == told
    sent = 2 + 2 + len(told[1])
    assert ended(sidecar, ends)[0]["bytes_upstream_to_client"] == sent
    after = value(scrape(sidecar), "conduit_bytes_total", direction="upstream_to_client")
    assert after - before == sent
    if closer == "provider":    # the payload sent: the reason redacted, not the provider's
        assert close_payload(sidecar) - payload_before == sent - 2


def close_payload(sidecar) -> float:
    metrics = scrape(sidecar)
    return value(metrics, "conduit_payload_bytes_total", direction="upstream_to_client", kind="close") or 0.0


def test_client_vanishing_closes_the_upstream(sidecar, upstream_ports):
    async def body():
        from websockets.asyncio.server import serve
        closed = asyncio.get_running_loop().create_future()

        async def handler(ws):
            try:
                async for _ in ws:
                    pass
            finally:
                closed.set_result(None)
        async with serve(handler, "127.0.0.1", upstream_ports["closer"]):
            ws = await connect(sidecar.url(provider="closer"), additional_headers=sidecar.auth())
            await ws.send(os.urandom(1000))
            # Vanish mid-frame: half a frame header and payload, then a reset.
            ws.transport.write(bytes([0x82, 0xFE, 0x10, 0x00]) + os.urandom(100))
            await asyncio.sleep(0.05)
            ws.transport.abort()
            await asyncio.wait_for(closed, 5)      # the provider leg is closed: no timeout
    run(body())


def test_secret_goes_upstream_and_the_virtual_key_does_not(sidecar, upstream_ports):
    async def body():
        from websockets.asyncio.server import serve
        seen = []

        async def handler(ws):
            seen.append((ws.request.path, ws.request.headers))
            await ws.close()
        async with serve(handler, "127.0.0.1", upstream_ports["raw"]):
            await close_of(sidecar.url(model="a%20b%26c%2F%C3%A9", provider="raw"),
                           {**sidecar.auth(), "Cookie": "session=1", "X-Custom": "y"},
                           subprotocols=["realtime"])
        return seen[0]
    path, headers = run(body())
    assert path == "/raw?model=a%20b%26c%2F%C3%A9"
    everything = path + "".join(f"{k}: {v}\n" for k, v in headers.raw_items())
    assert sidecar.keys.plain["good"] not in everything
    assert "Cookie" not in headers and "X-Custom" not in headers
    assert headers.get("Sec-WebSocket-Protocol") == "realtime"
    assert headers["X-Api-Key"] == PROVIDER_SECRET
    assert "Authorization" not in headers


def test_each_upstream_request_has_its_own_key_when_the_request_is_reused(sidecar, upstream_ports):
    """The upstream upgrade request is built once per URL, headers and offer: each
    session, also concurrent ones, must still send a fresh Sec-WebSocket-Key and have
    the provider's Sec-WebSocket-Accept checked against its own key (a wrong one: 1014)."""
    async def body():
        from websockets.asyncio.server import serve
        seen = []

        async def handler(ws):
            seen.append(ws.request.headers)
            await ws.close(4000, ws.subprotocol or "none")
        async with serve(handler, "127.0.0.1", upstream_ports["raw"],
                         select_subprotocol=lambda ws, offered: "realtime" if offered else None):
            offers = [["realtime"], None] * 4
            results = await asyncio.gather(*(close_of(sidecar.url(provider="raw"), sidecar.auth(),
                                                      subprotocols=o) for o in offers))
        return offers, results, seen
    offers, results, seen = run(body())
    assert results == [(4000, "realtime" if o else "none") for o in offers]
    keys = [h["Sec-WebSocket-Key"] for h in seen]
    assert len(set(keys)) == len(offers)
    assert sorted(h.get("Sec-WebSocket-Protocol") or "" for h in seen) == [""] * 4 + ["realtime"] * 4


def test_key_subprotocol_in_any_letter_case_is_taken_and_not_forwarded(sidecar, upstream_ports):
    """Review finding 9: `OpenAI-Insecure-API-Key.` was forwarded upstream as it was."""
    async def body():
        from websockets.asyncio.server import serve
        seen = []

        async def handler(ws):
            seen.append(ws.request.headers)
            await ws.close(4000, "seen")
        async with serve(handler, "127.0.0.1", upstream_ports["raw"],
                         select_subprotocol=lambda ws, offered: "realtime"):
            key = sidecar.keys.plain["good"]
            result = await close_of(sidecar.url(provider="raw"), subprotocols=[
                "realtime", f"OpenAI-Insecure-API-Key.{key}"])
        return result, seen[0]
    result, headers = run(body())
    assert result == (4000, "seen")
    assert headers.get("Sec-WebSocket-Protocol") == "realtime"


def test_a_dot_segment_model_never_reaches_a_path_template(tmp_path):
    """Review finding 9: `model=..` in `{model}` of a URL path made `/x/../y`."""
    port = held_port()
    proc = SidecarProcess(str(tmp_path), f'[providers.pathy]\nurl = "ws://127.0.0.1:{port}/x/{{model}}/y"\n',
                          standard_keys()).start()
    try:
        async def body():
            contacted = []
            server = await asyncio.start_server(lambda r, w: contacted.append(1), "127.0.0.1", port)
            async with server:
                results = [await close_of(proc.url(model=m, provider="pathy"), proc.auth())
                           for m in ("..", ".", "%2E%2E")]
            return results, contacted
        results, contacted = run(body())
        assert results == [(4004, "model is a dot segment")] * 3
        assert contacted == []
    finally:
        proc.stop()
