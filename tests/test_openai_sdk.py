"""The official openai Python SDK's realtime client, pointed at the sidecar with a
virtual key as its API key, against the mock provider."""

import base64

from openai import AsyncOpenAI

from conftest import run


def test_openai_sdk_completes_a_session(sidecar):
    async def body():
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{sidecar.port}/v1",
                             api_key=sidecar.keys.plain["good"])
        seen = []
        async with client.realtime.connect(model="mock-realtime") as conn:
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
    assert run(body()) == ["response.output_audio.delta", "response.done"]
