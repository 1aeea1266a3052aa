"""ElevenLabs' text-to-speech sockets (`/v1/text-to-speech/{voice_id}/stream-input` and
`multi-stream-input`) through the sidecar to the elevenlabs mock: the official SDK
unchanged but for its base URL and a virtual key, the voice id kept, the model in
`model_id`, the query allow-list, and the refusals."""

from __future__ import annotations

import base64
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import PROVIDER_SECRET, run
# The fixtures too: this module gets its own sidecar and mocks, configured as theirs.
from test_native_sdks import (_closed_with, last_session, log_mark, metric, native,  # noqa: F401
                              sidecar_ca_bundle)

VOICE = "21m00Tcm4TlvDq8ikWAM"
TTS = f"/v1/text-to-speech/{VOICE}/stream-input"


def _speak(native, key: str, chunks: list[str], **kwargs) -> bytes:
    """The SDK's realtime TTS (convert_realtime) through the sidecar's TLS listener (the
    SDK dials wss:// whatever its base URL's scheme): the audio it decoded."""
    from elevenlabs import VoiceSettings
    from elevenlabs.client import ElevenLabs
    client = ElevenLabs(api_key=key, base_url=f"https://127.0.0.1:{native.tls_port}")
    audio = client.text_to_speech.convert_realtime(
        VOICE, text=iter(chunks), voice_settings=VoiceSettings(stability=0.5, similarity_boost=0.8),
        **kwargs)
    return b"".join(audio)


def _upstream(native) -> tuple[str, dict[str, str], list[str]]:
    """(path, headers, first messages) of what the elevenlabs mock last received."""
    mock = native.mocks["elevenlabs"].mock
    path, headers = mock.requests[-1]
    return path, dict(headers.raw_items()), [m.decode() for m in mock.first_messages]


def _open_and_end(native, path: str, key: str) -> list[dict]:
    """A stream-input session that opens and ends at once: what the provider sent."""
    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}{path}",
                           additional_headers={"xi-api-key": key}) as ws:
            await ws.send(json.dumps({"text": " "}))
            await ws.send(json.dumps({"text": ""}))
            return [json.loads(m) async for m in ws]
    return run(body())


def test_the_sdk_speaks_through_the_sidecar(native, sidecar_ca_bundle):
    mark = log_mark(native)
    key = native.keys.plain["good"]
    first_before = len(native.mocks["elevenlabs"].mock.first_messages)
    audio = _speak(native, key, ["Hello there. ", "How are you?"], model_id="eleven_flash_v2_5",
                   output_format="pcm_16000")
    # The mock voices text as its UTF-8 bytes: the text went, the audio came back decoded.
    assert audio.decode().split() == ["Hello", "there.", "How", "are", "you?"]
    path, headers, firsts = _upstream(native)
    assert path == f"{TTS}?model_id=eleven_flash_v2_5&output_format=pcm_16000"
    assert headers["xi-api-key"] == PROVIDER_SECRET
    # The SDK sends its key as the xi-api-key header only: the first message has none.
    assert len(firsts) == first_before + 1
    first = json.loads(firsts[-1])
    assert first["text"] == " " and first["voice_settings"]["stability"] == 0.5
    assert not {"xi-api-key", "xi_api_key", "authorization"} & set(first)
    assert "condt_" not in path + str(headers) + "".join(firsts) and key not in str(headers)
    end = last_session(native, "elevenlabs", mark)
    assert (end["key_id"], end["model"], end["close_code"]) == ("good", "eleven_flash_v2_5", 1000)
    # TTS is billed per character, which the sidecar does not count: nothing metered.
    assert not any(end["usage_tokens"].values()) and not any(end["usage_seconds"].values())
    assert metric(native, "conduit_usage_tokens_total", key_id="good", provider="elevenlabs",
                  model="eleven_flash_v2_5", kind="input") == 0


def test_without_model_id_the_provider_chooses(native, sidecar_ca_bundle):
    """The SDK leaves model_id out unless given one: ElevenLabs' default model, and no
    agent_id (the template's model parameter) upstream."""
    assert _speak(native, native.keys.plain["good"], ["Hi. "], output_format=None).split() == [b"Hi."]
    path, _, _ = _upstream(native)
    assert path == TTS


def test_multi_stream_input_keeps_contexts(native):
    """No Python SDK client for it: its messages as ElevenLabs' reference gives them."""
    key = native.keys.plain["good"]
    path = f"/v1/text-to-speech/{VOICE}/multi-stream-input?model_id=eleven_flash_v2_5"

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}{path}",
                           additional_headers={"xi-api-key": key}) as ws:
            for message in ({"text": " ", "context_id": "a"},
                            {"text": "One. ", "context_id": "a", "flush": True},
                            {"text": " ", "context_id": "b"},
                            {"text": "Two. ", "context_id": "b"},
                            {"context_id": "b", "close_context": True},
                            {"close_socket": True}):
                await ws.send(json.dumps(message))
            return [json.loads(m) async for m in ws]

    got = run(body())
    audio = [(m["contextId"], base64.b64decode(m["audio"])) for m in got if m.get("audio")]
    assert audio == [("a", b"One. "), ("b", b"Two. ")]
    assert [m["contextId"] for m in got if m.get("isFinal")] == ["b", "a"]
    upstream, headers, _ = _upstream(native)
    assert upstream == path and headers["xi-api-key"] == PROVIDER_SECRET and key not in str(headers)


def test_only_allow_listed_parameters_pass(native):
    """Session parameters pass; the template's own (agent_id), the agents' (signature,
    source) and credentials (authorization, single_use_token) do not."""
    key = native.keys.plain["good"]
    query = ("model_id=eleven_v3&output_format=ulaw_8000&sync_alignment=true&seed=7"
             "&inactivity_timeout=60&agent_id=agent_x&conversation_signature=s&source=x"
             "&authorization=Bearer%20t&single_use_token=t&not_listed=1")
    assert _open_and_end(native, f"{TTS}?{query}", key) == [{"isFinal": True}]
    path, _, _ = _upstream(native)
    assert path == (f"{TTS}?model_id=eleven_v3&output_format=ulaw_8000&sync_alignment=true"
                    "&seed=7&inactivity_timeout=60")


def test_wrong_or_missing_key_gets_4001(native, sidecar_ca_bundle):
    from elevenlabs.core.api_error import ApiError
    before = len(native.mocks["elevenlabs"].mock.requests)
    with pytest.raises(ApiError) as exc:
        _speak(native, "condt_wrong", ["Hello. "])
    assert (exc.value.status_code, exc.value.body) == (4001, "unknown key")
    # A signature or a public agent stands for a key on the agents' path only.
    assert _closed_with(native, f"{TTS}?conversation_signature=forged") == (4001, "missing key")
    assert _closed_with(native, f"{TTS}?model_id=agent_public_demo") == (4001, "missing key")
    # ElevenLabs' other key forms are not read: a virtual key in them is refused outright.
    for param in ("authorization", "single_use_token"):
        with pytest.raises(InvalidStatus) as refused:
            _closed_with(native, f"{TTS}?{param}={native.keys.plain['good']}")
        assert refused.value.response.status_code == 400
    assert len(native.mocks["elevenlabs"].mock.requests) == before


def test_model_not_allowed_gets_4003(native, sidecar_ca_bundle):
    """`models-only` may use gpt-realtime* only: not a TTS model, and not ElevenLabs'
    default either (no model_id: nothing to check, so refused)."""
    from elevenlabs.core.api_error import ApiError
    key = native.keys.plain["models-only"]
    before = len(native.mocks["elevenlabs"].mock.requests)
    with pytest.raises(ApiError) as exc:
        _speak(native, key, ["Hello. "], model_id="eleven_flash_v2_5")
    assert (exc.value.status_code, exc.value.body) == (
        4003, "model 'eleven_flash_v2_5' not allowed for this key")
    assert _closed_with(native, TTS, {"xi-api-key": key}) == (
        4003, "the session names no model: not allowed for this key")
    restricted = {"xi-api-key": native.keys.plain["restricted"]}  # openai only
    assert _closed_with(native, f"{TTS}?model_id=eleven_v3", restricted) == (
        4003, "provider 'elevenlabs' not allowed for this key")
    assert len(native.mocks["elevenlabs"].mock.requests) == before


@pytest.mark.parametrize("template", [
    '{"text": " ", "xi_api_key": "KEY"}',
    '{"text": " ", "xi_api_key": "ESCAPED"}',
    # Not JSON to msgspec, but to Python's json, which reads NaN, and the key with it.
    '{"text": " ", "xi_api_key": "ESCAPED", "x": NaN}',
    # The first of two: a parser that keeps the first reads it.
    '{"text": " ", "xi_api_key": "ESCAPED", "xi_api_key": "x"}',
    # Nested deeper than msgspec recurses (RecursionError: it was 1011, a bug of ours).
    '{"text": " ", "xi_api_key": "ESCAPED", "x": %s}' % ("[" * 100_000 + "]" * 100_000),
])
def test_a_virtual_key_in_the_first_message_never_reaches_the_provider(native, template):
    """ElevenLabs also reads a key from the first message (`xi_api_key`, as its own
    WebSocket guide opens): one holding a virtual key, even JSON-escaped, gets 4003
    and the provider sees neither it nor the session."""
    key = native.keys.plain["good"]
    first = template.replace("ESCAPED", key.replace("condt_", "condt\\u005f")).replace("KEY", key)
    mock = native.mocks["elevenlabs"].mock
    before = len(mock.requests)

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}{TTS}", additional_headers={"xi-api-key": key}) as ws:
            await ws.send(first)
            await ws.wait_closed()
            return ws.close_code, ws.close_reason
    assert run(body()) == (4003, "a virtual key in the first message")
    assert len(mock.requests) == before
    assert all("condt" not in m.decode() for m in mock.first_messages)


def test_bad_voice_ids_are_refused_before_anything_goes_upstream(native):
    """Voice ids are 1 to 64 letters and digits; anything else never reaches a URL."""
    key = native.keys.plain["good"]
    for voice in (VOICE, "x" * 64, "0"):
        assert _open_and_end(native, f"/v1/text-to-speech/{voice}/stream-input", key) == [
            {"isFinal": True}]
        assert native.mocks["elevenlabs"].mock.requests[-1][0] == f"/v1/text-to-speech/{voice}/stream-input"
    before = len(native.mocks["elevenlabs"].mock.requests)
    for voice, status in (("not-alnum", 404), ("a%2Fb", 404), ("a%41", 404), ("x" * 65, 404),
                          ("", 404), ("..", 400)):
        with pytest.raises(InvalidStatus) as exc:
            _closed_with(native, f"/v1/text-to-speech/{voice}/stream-input", {"xi-api-key": key})
        assert exc.value.response.status_code == status, voice
    assert len(native.mocks["elevenlabs"].mock.requests) == before


def test_the_upstream_url_from_the_built_in_template():
    """The voice id replaces the agents' path, model_id the template's agent_id; a URL
    that is not the agents' path cannot serve TTS (4004 at the handshake)."""
    from conduit_sidecar.config import load
    from conduit_sidecar.providers import native as native_path
    from conduit_sidecar.routing import Router
    where = native_path(f"/v1/text-to-speech/{VOICE}/multi-stream-input")
    assert where is not None and where.provider == "elevenlabs" and where.model_param == "model_id"
    conf = load(None, environ={}, overrides={"providers": {"elevenlabs": {"secret_env": "X"}}})
    router = Router(conf, environ={"X": "s"})
    route = router.routes["elevenlabs"]
    assert route.serves(where.kept)
    up = router.upstream(route.targets[0], "eleven_v3", (("output_format", "pcm_16000"),), where.kept)
    assert up.uri.resource_name == (f"/v1/text-to-speech/{VOICE}/multi-stream-input"
                                    "?model_id=eleven_v3&output_format=pcm_16000")
    assert up.headers == [("xi-api-key", "s")] and up.uri.host == "api.elevenlabs.io"
    assert router.upstream(route.targets[0], None, (), where.kept).uri.resource_name == (
        f"/v1/text-to-speech/{VOICE}/multi-stream-input")
    other = load(None, environ={}, overrides={"providers": {"elevenlabs": {
        "secret_env": "X", "url": "wss://proxy.example/tts?agent_id={model}"}}})
    assert not Router(other, environ={"X": "s"}).routes["elevenlabs"].serves(where.kept)
