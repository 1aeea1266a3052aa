"""A session a limit ends is told so in its provider's own event shape before the
close code (DESIGN.md, "Governance across the session"): each provider's SDK, through
the sidecar to its mock, with a key whose `max_session_seconds` is 1, sees the event
as its own and then the close 4008. The events of a budget (4002) have the same
shapes (tests/test_policy.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.exceptions import ConnectionClosed

from conftest import run
from test_deepgram_agent import SETTINGS
from test_elevenlabs_scribe import _transcribe
# The fixtures too: this module gets its own sidecar and mocks, configured as theirs.
from test_native_sdks import _deepgram_client, native, sidecar_ca_bundle  # noqa: F401

REASON = "session cap of 1 s reached"


async def _deepgram_until_closed(connecting, first=None) -> tuple[list, BaseException | None]:
    """The messages a deepgram-sdk connection gets until the sidecar closes it (its
    iterator ends, or raises: that is returned), with 20 ms of silence sent every 20 ms
    (and `first(conn)` sent first)."""
    got: list = []
    async with connecting() as conn:
        if first is not None:
            await first(conn)

        async def talk():
            while True:
                await conn.send_media(bytes(640))
                await asyncio.sleep(0.02)
        talking = asyncio.create_task(talk())
        try:
            async with asyncio.timeout(10):
                async for message in conn:
                    got.append(message)
        except Exception as exc:  # the SDK's way of saying the socket closed
            return got, exc
        finally:
            talking.cancel()
    return got, None


@pytest.mark.parametrize("socket,kind,field", [
    ("/v1/listen", "ListenV1Error", "variant"),
    ("/v2/listen", "ListenV2FatalError", "code"),
    ("/v1/agent/converse", "AgentV1Error", "code"),
])
def test_deepgram(native, socket, kind, field):
    from deepgram.agent.v1.types import AgentV1Settings
    client = _deepgram_client(native, native.keys.plain["capped"])
    audio = {"encoding": "linear16", "sample_rate": "16000"}
    connecting, first = {
        "/v1/listen": (lambda: client.listen.v1.connect(model="nova-3", **audio), None),
        "/v2/listen": (lambda: client.listen.v2.connect(model="flux-general-en", **audio), None),
        "/v1/agent/converse": (client.agent.v1.connect,
                               lambda agent: agent.send_settings(AgentV1Settings.model_validate(SETTINGS))),
    }[socket]
    got, closed = run(_deepgram_until_closed(connecting, first))
    errors = [m for m in got if getattr(m, "type", None) == "Error"]
    assert [(type(e).__name__, getattr(e, field), e.description) for e in errors] == [
        (kind, "session_limit_reached", REASON)], got
    # The SDK iterates websockets' connection: a close other than 1000/1001 raises.
    assert isinstance(closed, ConnectionClosed) and (closed.rcvd.code, closed.rcvd.reason) == (
        4008, REASON), closed


def test_assemblyai(native):
    from assemblyai.streaming.v3 import (StreamingClient, StreamingClientOptions, StreamingEvents,
                                         StreamingParameters)
    errors = []
    client = StreamingClient(StreamingClientOptions(api_key=native.keys.plain["capped"],
                                                    api_host=f"ws://127.0.0.1:{native.port}"))
    client.on(StreamingEvents.Error, lambda _, error: errors.append(error))
    client.connect(StreamingParameters(sample_rate=16000, speech_model="u3-rt-pro"))

    def silence():
        while not errors:
            time.sleep(0.02)
            yield bytes(640)
    client.stream(silence())
    client.disconnect()
    assert [(e.code, str(e)) for e in errors] == [(4008, REASON)]


def test_gemini(native, sidecar_ca_bundle):
    from google import genai
    from google.genai import errors
    client = genai.Client(api_key=native.keys.plain["capped"],
                          http_options={"base_url": f"https://127.0.0.1:{native.tls_port}"})

    async def body():
        got = []
        try:
            async with client.aio.live.connect(model="gemini-2.5-flash-live",
                                               config={"response_modalities": ["TEXT"]}) as session:
                async with asyncio.timeout(10):
                    while True:
                        async for message in session.receive():
                            got.append(message)
        except errors.APIError as exc:
            return got, exc
        return got, None
    got, closed = run(body())
    assert [m.go_away.time_left for m in got if m.go_away] == ["0s"], got
    assert closed is not None and closed.code == 4008 and REASON in str(closed), closed


def test_elevenlabs_scribe(native):
    got, closed = _transcribe(native, native.keys.plain["capped"], [])
    assert {"message_type": "session_time_limit_exceeded", "error": REASON} in got, got
    assert (closed["code"], closed["reason"]) == (4008, REASON)
