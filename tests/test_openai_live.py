"""OpenAI's Live API sockets through the sidecar to the openai mock, with the openai
SDK unchanged (`client.live.connect()`, `live.forks.connect()`,
`live.sideband.connect()`) but for its base URL and a virtual key as its API key. The
model is named in the first message (`session.start`), held and checked there; usage
is the session's billable seconds so far, metered by their rise."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import PROVIDER_SECRET, run
# The fixtures too: this module gets its own sidecar and mocks, configured as theirs.
from test_native_sdks import (_close_of, _last_request, _until_closed, last_session, log_mark,  # noqa: F401
                              metric, metric_becomes, native, node, sidecar_ca_bundle)

MODEL = "gpt-live-1"
SECOND = base64.b64encode(bytes(48000)).decode()  # a second of pcm16 at 24 kHz


def _client(native, key: str):
    from openai import AsyncOpenAI
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{native.port}/v1", api_key=key)


def _live(native, key_id: str, session: dict | None = None, seconds: int = 2):
    """A Live session through the SDK: session.start, `seconds` one-second audio
    appends, session.close. (the session.started event, the event types after it), or
    the close code and reason."""
    from openai import APIError

    async def body():
        try:
            async with _client(native, native.keys.plain[key_id]).live.connect() as conn:
                await conn.session.start(session=session or {"model": MODEL})
                started = await conn.recv()
                for _ in range(seconds):
                    await conn.session.input_audio.append(audio=SECOND)
                await conn.session.close()
                seen = await _until_closed(conn, SECOND)
                assert seen[-1].usage.seconds == seconds
                return started, [e.type for e in seen]
        except (ConnectionClosed, APIError) as exc:
            return _close_of(exc)
    return run(body())


def test_live_session_through_the_sdk(native):
    """/v1/live/sessions goes to the template's path with /live/sessions in place of
    /realtime, no model in the URL, the provider secret as Bearer; the held
    session.start reaches the provider as sent, its model the session's label."""
    mark = log_mark(native)
    labels = dict(key_id="good", provider="openai", model=MODEL, kind="audio")
    before = metric(native, "conduit_usage_seconds_total", **labels)
    started, seen = _live(native, "good")
    assert (started.type, started.session.model) == ("session.started", MODEL)
    assert seen == ["session.output_audio.delta", "session.usage.updated"] * 2 + ["session.closed"]
    path, headers = _last_request(native, "openai")
    assert path == "/v1/live/sessions"
    assert headers["Authorization"] == f"Bearer {PROVIDER_SECRET}"
    assert "condt_" not in path + str(headers)
    end = last_session(native, "openai", mark)
    assert (end["key_id"], end["model"]) == ("good", MODEL)
    # Reports of 1 s, 2 s and (session.closed) 2 s so far: 2 s, not 5.
    assert metric_becomes(native, before + 2, "conduit_usage_seconds_total", **labels) == before + 2
    assert end["usage_seconds"] == {"audio": 2.0}


def test_live_models_are_checked_in_session_start(native):
    """allowed_models is checked against session.start's model and its delegated
    backend's; the upstream is never opened for a refused one."""
    mock = native.mocks["openai"].mock
    opened = len(mock.requests)
    assert _live(native, "models-only") == (4003, f"model {MODEL!r} not allowed for this key")
    delegated = {"model": MODEL, "delegation": {"type": "responses", "responses": {"model": "gpt-5"}}}
    assert _live(native, "live-only", delegated) == (4003, "model 'gpt-5' not allowed for this key")
    assert len(mock.requests) == opened
    started, _ = _live(native, "live-only", seconds=0)
    assert started.session.model == MODEL


def _live_update(native, key_id: str, update: dict):
    """A Live session through the SDK that sends `update` as a session.update after
    its session.started, then one second of audio: (the delegated model the
    session.updated echo names, the next event's type), or the close code and reason."""
    from openai import APIError

    async def body():
        try:
            async with _client(native, native.keys.plain[key_id]).live.connect() as conn:
                await conn.session.start(session={"model": MODEL})
                await conn.recv()
                await conn.session.update(session=update)
                updated = await conn.recv()
                await conn.session.input_audio.append(audio=SECOND)
                return updated.session.delegation.responses.model, (await conn.recv()).type
        except (ConnectionClosed, APIError) as exc:
            return _close_of(exc)
    return run(body())


def test_live_later_session_update_is_checked_too(native):
    """session.update can change the delegated backend's model (and give it tools):
    it was relayed unread, past allowed_models. Later text messages of a Live session
    are now read whole and withheld until read: a model the key may not use, or a
    virtual key, ends the session and never reaches OpenAI; an allowed one goes on,
    and the audio after it."""
    def delegated(model, **responses):
        return {"delegation": {"type": "responses", "responses": {"model": model, **responses}}}
    assert _live_update(native, "live-only", delegated("gpt-5")) == (
        4003, "model 'gpt-5' not allowed for this key")
    allowed = delegated("gpt-live-mini")   # allowed_models: gpt-live-*
    assert _live_update(native, "live-only", allowed) == ("gpt-live-mini", "session.output_audio.delta")
    tool = {"type": "mcp", "server_label": "mine", "server_url": "https://mcp.example",
            "authorization": native.keys.plain["good"]}
    assert _live_update(native, "good", delegated("gpt-5", tools=[tool])) == (
        4003, "a virtual key in a later message")


def test_live_a_second_session_start_is_checked_too(native):
    from openai import APIError

    async def body():
        try:
            async with _client(native, native.keys.plain["live-only"]).live.connect() as conn:
                await conn.session.start(session={"model": MODEL})
                await conn.recv()
                await conn.session.start(session={"model": MODEL, "delegation": {
                    "type": "responses", "responses": {"model": "gpt-5"}}})
                await asyncio.wait_for(conn.recv(), 10)       # (the mock answers none)
        except (ConnectionClosed, APIError) as exc:
            return _close_of(exc)
    assert run(body()) == (4003, "model 'gpt-5' not allowed for this key")


def test_live_messages_after_a_refused_one_are_not_judged(native):
    """Once a later message is refused, what the client sent behind it goes nowhere
    (the provider's close is out) and is not read: one `message_refused` line, not one
    per message."""
    key = native.keys.plain["live-only"]
    start = json.dumps({"type": "session.start", "session": {"model": MODEL}})
    update = json.dumps({"type": "session.update", "session": {"delegation": {
        "type": "responses", "responses": {"model": "gpt-5"}}}})
    mark = log_mark(native)

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}/v1/live/sessions",
                           additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send(start)
            assert json.loads(await ws.recv())["type"] == "session.started"
            for _ in range(3):
                await ws.send(update)
            with pytest.raises(ConnectionClosed) as exc:
                while True:
                    await ws.recv()
        return exc.value.rcvd.code
    assert run(body()) == 4003
    last_session(native, "openai", mark)
    refused = [r for r in native.log_lines()[mark:] if r.get("event") == "message_refused"]
    assert len(refused) == 1, refused


def test_live_later_messages_are_bounded_by_first_message_bytes(native):
    """A later message is held whole (raw and unmasked) before it goes on: like the
    first, it is at most first_message_bytes (1 MiB here), 1009 at its header, where
    other sessions take max_message_bytes (16 MiB)."""
    key = native.keys.plain["good"]

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}/v1/live/sessions", max_size=None,
                           additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send(json.dumps({"type": "session.start", "session": {"model": MODEL}}))
            assert json.loads(await ws.recv())["type"] == "session.started"
            await ws.send("x" * (1024 * 1024 + 1))
            with pytest.raises(ConnectionClosed) as exc:
                while True:
                    await ws.recv()
        return exc.value.rcvd.code, exc.value.rcvd.reason
    assert run(body()) == (1009, "client: message over 1048576 bytes")


def test_live_wrong_key_gets_4001(native):
    from openai import APIError

    async def body():
        try:
            async with _client(native, "condt_wrong").live.connect() as conn:
                await conn.session.start(session={"model": MODEL})
                await conn.recv()
        except (ConnectionClosed, APIError) as exc:
            return _close_of(exc)
    assert run(body()) == (4001, "unknown key")


def test_live_first_message_must_be_json(native):
    key = native.keys.plain["good"]

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}/v1/live/sessions",
                           additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send("not json")
            with pytest.raises(ConnectionClosed) as exc:
                await ws.recv()
        return exc.value.rcvd.code, exc.value.rcvd.reason
    assert run(body()) == (1002, "the first message must be a JSON client event")


def test_live_session_start_holding_a_virtual_key_is_refused(native):
    """An app that gives a delegated MCP server its virtual key would send it to OpenAI
    and on: refused, the upstream never opened."""
    mock = native.mocks["openai"].mock
    opened = len(mock.requests)
    key = native.keys.plain["good"]
    tool = {"type": "mcp", "server_label": "mine", "server_url": "https://mcp.example",
            "authorization": key}
    delegated = {"model": MODEL,
                 "delegation": {"type": "responses", "responses": {"model": "gpt-5", "tools": [tool]}}}
    assert _live(native, "good", delegated) == (4003, "a virtual key in the first message")
    assert len(mock.requests) == opened


@pytest.mark.parametrize("session, reason", [
    ('{"model": "gpt-5", "model": "gpt-live-1"}', "the first message names a member twice"),
    ('{"model": "gpt-live-1", "delegation": {"type": "responses", "Responses": {"model": "gpt-5"}}}',
     "the first message spells 'responses' in another case"),
])
def test_live_session_start_openai_could_read_otherwise_is_refused(native, session, reason):
    """msgspec keeps the last of a member named twice and skips a name in another case;
    OpenAI's parser may keep the first, or read `Responses`: the model checked would not
    be the one billed. Refused, the upstream never opened."""
    mock = native.mocks["openai"].mock
    opened = len(mock.requests)
    key = native.keys.plain["live-only"]

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}/v1/live/sessions",
                           additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send('{"type": "session.start", "session": %s}' % session)
            with pytest.raises(ConnectionClosed) as exc:
                await ws.recv()
        return exc.value.rcvd.code, exc.value.rcvd.reason
    assert run(body()) == (1002, reason)
    assert len(mock.requests) == opened


def test_live_other_providers_do_not_serve_it(native):
    key = native.keys.plain["good"]

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}/v1/live/sessions?provider=azure",
                           additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            with pytest.raises(ConnectionClosed) as exc:
                await ws.recv()
        return exc.value.rcvd.code, exc.value.rcvd.reason
    assert run(body()) == (4004, "provider 'azure' does not serve /v1/live/sessions")


def test_live_session_limit_is_told_as_an_error_event(native):
    """A key whose max_session_seconds is 1: the SDK reads OpenAI's error event, then
    the close 4008."""
    async def body():
        errors = []
        async with _client(native, native.keys.plain["capped"]).live.connect() as conn:
            await conn.session.start(session={"model": MODEL})
            try:
                async for event in conn:
                    if event.type == "error":
                        errors.append(event.error)
            except ConnectionClosed as exc:
                return errors, exc.rcvd.code
        return errors, None
    errors, code = run(body(), timeout=20)
    assert [(e.code, e.message) for e in errors] == [
        ("session_limit_reached", "session cap of 1 s reached")]
    assert code == 4008


def test_live_fork_and_sideband_through_the_sdk(native):
    """A fork and a sideband name a stored session by id; its model cannot be checked,
    so a key limited to models is refused them, as call_id sessions are. A fork is a
    session of its own and metered; a sideband's usage is its session's, not metered
    again."""
    from openai import APIError
    client = _client(native, native.keys.plain["good"])
    labels = dict(key_id="good", provider="openai", kind="audio")

    async def fork():
        async with client.live.forks.connect(session_id="sess_stored1") as conn:
            await conn.session.start(session={})
            started = await conn.recv()
            await conn.session.input_audio.append(audio=SECOND)
            kinds = [(await conn.recv()).type for _ in range(2)]
            return started.session.model, kinds

    async def sideband():
        async with client.live.sideband.connect(session_id="sess_stored1", graceful_close=True) as conn:
            usage = await conn.recv()
            await conn.session.close()
            closed = await conn.recv()
            return (usage.type, usage.usage.seconds), (closed.type, closed.usage.seconds)

    async def refused(connecting):
        try:
            async with connecting as conn:
                await conn.recv()
        except (ConnectionClosed, APIError) as exc:
            return _close_of(exc)

    before = metric(native, "conduit_usage_seconds_total", model="live_fork", **labels)
    assert run(fork()) == ("gpt-live-1", ["session.output_audio.delta", "session.usage.updated"])
    path, headers = _last_request(native, "openai")
    assert path == "/v1/live/sessions/sess_stored1/fork"
    assert headers["Authorization"] == f"Bearer {PROVIDER_SECRET}" and "condt_" not in str(headers)
    assert metric_becomes(native, before + 1, "conduit_usage_seconds_total", model="live_fork",
                          **labels) == before + 1

    mark = log_mark(native)
    assert run(sideband()) == (("session.usage.updated", 5.0), ("session.closed", 5.0))
    assert _last_request(native, "openai")[0] == "/v1/live/sessions/sess_stored1/attach?graceful_close=true"
    end = last_session(native, "openai", mark)
    assert (end["model"], end["usage_seconds"]) == ("live_attach", {"audio": 0.0})

    limited = _client(native, native.keys.plain["models-only"])
    reason = "the session names no model: not allowed for this key"
    assert run(refused(limited.live.forks.connect(session_id="sess_stored1"))) == (4003, reason)
    assert run(refused(limited.live.sideband.connect(session_id="sess_stored1"))) == (4003, reason)


def test_live_session_start_is_forwarded_verbatim(native):
    """The held session.start reaches the provider byte for byte (its echo of the
    session config shows what it read)."""
    key = native.keys.plain["good"]
    start = json.dumps({"type": "session.start",
                        "session": {"model": MODEL, "instructions": "be brief \u00e9"}})

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}/v1/live/sessions",
                           additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send(start)
            return json.loads(await ws.recv())
    started = run(body())
    assert started["type"] == "session.started"
    assert started["session"]["instructions"] == "be brief \u00e9"


def test_live_node_sdk(native):
    """The npm openai package's LiveWS: the same session, and 4003 for a model the key
    does not allow."""
    out = node("openai_live_test.mjs", str(native.port), native.keys.plain["live-only"], MODEL)
    assert (out["started"], out["seconds"]) == (MODEL, 1), out
    assert out["seen"] == ["session.started", "session.output_audio.delta", "session.usage.updated",
                           "session.closed"], out
    assert _last_request(native, "openai")[0] == "/v1/live/sessions"
    out = node("openai_live_test.mjs", str(native.port), native.keys.plain["live-only"], "gpt-realtime")
    assert (out["closeCode"], out["closeReason"]) == (4003, "model 'gpt-realtime' not allowed for this key"), out


def test_live_session_id_holding_a_virtual_key_is_refused(native):
    """A virtual key given as the stored session's id (the SDK's session_id= and
    api_key= swapped) would go to OpenAI in the upstream path: 400, as a key in a query
    parameter that holds none; no upstream opened."""
    from websockets.exceptions import InvalidStatus
    mock = native.mocks["openai"].mock
    opened = len(mock.requests)
    key = native.keys.plain["good"]

    async def body(kind):
        with pytest.raises(InvalidStatus) as exc:
            async with connect(f"ws://127.0.0.1:{native.port}/v1/live/sessions/{key}/{kind}",
                               additional_headers={"Authorization": f"Bearer {key}"}) as ws:
                await ws.recv()
        return exc.value.response.status_code, exc.value.response.body
    for kind in ("fork", "attach"):
        assert run(body(kind)) == (400, b"a virtual key in the request path\n")
    assert len(mock.requests) == opened


def test_live_fork_session_start_holding_a_virtual_key_is_refused(native):
    """A fork's session.start may give its delegated backend new tools (an MCP server's
    `authorization`) as live.connect()'s does: a virtual key there would go to OpenAI
    and on. It was relayed unread; now refused as on /v1/live/sessions, the upstream
    never opened."""
    from openai import APIError
    mock = native.mocks["openai"].mock
    opened = len(mock.requests)
    key = native.keys.plain["good"]
    tool = {"type": "mcp", "server_label": "mine", "server_url": "https://mcp.example",
            "authorization": key}

    async def body():
        try:
            async with _client(native, key).live.forks.connect(session_id="sess_stored1") as conn:
                await conn.session.start(session={"delegation": {"type": "responses",
                                                                 "responses": {"tools": [tool]}}})
                await conn.recv()
        except (ConnectionClosed, APIError) as exc:
            return _close_of(exc)
    assert run(body()) == (4003, "a virtual key in the first message")
    assert len(mock.requests) == opened
