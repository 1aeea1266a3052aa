"""The official openai Python SDK's realtime client, pointed at the sidecar with a
virtual key as its API key, against the mock provider."""

import base64
import ssl

from openai import AsyncOpenAI

from conftest import run


async def sdk_session(port: int, key: str, model: str, tls: ssl.SSLContext | None = None) -> list[str]:
    """One SDK session through the sidecar (its wss listener with `tls`, the context
    that trusts it): session.created, one audio chunk, its response; returns the event
    types after session.created."""
    client = AsyncOpenAI(base_url=f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1", api_key=key)
    seen = []
    async with client.realtime.connect(model=model, websocket_connection_options={"ssl": tls} if tls else {}) as conn:
        event = await conn.recv()
        assert event.type == "session.created"
        audio = base64.b64encode(bytes(4800)).decode()
        await conn.input_audio_buffer.append(audio=audio)
        await conn.input_audio_buffer.commit()
        async for event in conn:
            seen.append(event.type)
            if event.type == "response.output_audio.delta":
                assert event.delta == audio
            if event.type == "response.done":
                assert event.response.usage.input_token_details.audio_tokens == 1
                break
    return seen


def test_openai_sdk_completes_a_session(sidecar):
    seen = run(sdk_session(sidecar.port, sidecar.keys.plain["good"], "mock-realtime"))
    assert seen == ["response.output_audio.delta", "response.done"]


async def sdk_translation(port: int, key: str, model: str) -> tuple[str, list[str]]:
    """One translation session (realtime.translations.connect): the session's type,
    and the event types after session.created."""
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
    async with client.realtime.translations.connect(model=model) as conn:
        created = await conn.recv()
        assert created.type == "session.created" and created.session.model == model
        audio = base64.b64encode(bytes(9600)).decode()
        await conn.session.input_audio_buffer.append(audio=audio)
        await conn.session.close()
        seen = [event.type async for event in conn]
    return created.session.type, seen


def test_openai_sdk_translation_session_to_a_provider_of_ones_own(sidecar):
    """A provider of the user's whose URL path ends in /realtime serves translations."""
    kind, seen = run(sdk_translation(sidecar.port, sidecar.keys.plain["good"], "mock-translate"))
    assert (kind, seen) == ("translation", ["session.output_audio.delta", "session.closed"])
