"""ElevenLabs' realtime speech to text (Scribe, `/v1/speech-to-text/realtime`) through the
sidecar to the elevenlabs mock: the official SDK unchanged but for its base URL and a
virtual key, the model in `model_id`, the query allow-list, and the refusals."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import PROVIDER_SECRET, run
# The fixtures too: this module gets its own sidecar and mocks, configured as theirs.
from test_native_sdks import _closed_with, _last_request, last_session, log_mark, metric, native  # noqa: F401

SCRIBE = "/v1/speech-to-text/realtime"
MODEL = "scribe_v2_realtime"


def _transcribe(native, key: str, audio: list[bytes], **options) -> tuple[list[dict], dict]:
    """The SDK's realtime connection (client.speech_to_text.realtime.connect) through the
    sidecar's plain listener (an http:// base URL gives ws://): the messages it got, and
    how it closed. With `audio`, the chunks are sent and committed, and the SDK closes
    once the committed transcript is in; without, the sidecar is waited for to close."""
    from elevenlabs import AudioFormat, RealtimeEvents
    from elevenlabs.client import ElevenLabs
    client = ElevenLabs(api_key=key, base_url=f"http://127.0.0.1:{native.port}")

    async def body():
        got: list[dict] = []
        committed, closed = asyncio.Event(), asyncio.get_running_loop().create_future()
        conn = await client.speech_to_text.realtime.connect(
            {"model_id": MODEL, "audio_format": AudioFormat.PCM_16000, "sample_rate": 16000, **options})
        # Registered before the SDK's reader task first runs: no message is missed.
        for event in (RealtimeEvents.SESSION_STARTED, RealtimeEvents.PARTIAL_TRANSCRIPT,
                      RealtimeEvents.COMMITTED_TRANSCRIPT_WITH_TIMESTAMPS, RealtimeEvents.ERROR):
            conn.on(event, got.append)
        conn.on(RealtimeEvents.COMMITTED_TRANSCRIPT, lambda m: (got.append(m), committed.set()))
        conn.on(RealtimeEvents.CLOSE, lambda info: closed.done() or closed.set_result(info))
        if audio:
            for chunk in audio:
                await conn.send({"audio_base_64": base64.b64encode(chunk).decode()})
            await conn.commit()
            await asyncio.wait_for(committed.wait(), 5)
            await conn.close()
        return got, await asyncio.wait_for(closed, 5)
    return run(body())


def _requests(native) -> int:
    return len(native.mocks["elevenlabs"].mock.requests)


def test_the_sdk_transcribes_through_the_sidecar(native):
    mark = log_mark(native)
    key = native.keys.plain["good"]
    got, closed = _transcribe(native, key, [bytes(3200), bytes(3200)], language_code="en",
                              include_timestamps=True, keyterms=["conduit", "sidecar"])
    assert [(m["message_type"], m.get("text")) for m in got] == [
        ("session_started", None),
        ("partial_transcript", "3200 bytes at pcm_16000"),
        ("partial_transcript", "6400 bytes at pcm_16000"),
        ("committed_transcript", "6400 bytes at pcm_16000"),
        ("committed_transcript_with_timestamps", "6400 bytes at pcm_16000"),
    ]
    assert got[0]["config"]["model_id"] == MODEL and closed["code"] == 1000
    path, headers = _last_request(native, "elevenlabs")
    # The template's agent_id gave way to model_id, first; the SDK's parameters follow.
    assert path == (f"{SCRIBE}?model_id={MODEL}&audio_format=pcm_16000&commit_strategy=manual"
                    "&language_code=en&include_timestamps=true&keyterms=conduit&keyterms=sidecar")
    assert headers["xi-api-key"] == PROVIDER_SECRET
    assert "condt_" not in path + str(headers.raw_items())
    end = last_session(native, "elevenlabs", mark)
    assert (end["key_id"], end["model"], end["close_code"]) == ("good", MODEL, 1000)
    # Scribe is billed by audio time, which no event reports; the audio came base64 in
    # JSON text frames, which the sidecar does not read: nothing metered.
    assert not any(end["usage_tokens"].values()) and not any(end["usage_seconds"].values())
    assert metric(native, "conduit_usage_seconds_total", key_id="good", provider="elevenlabs",
                  model=MODEL, kind="audio") == 0


def test_only_allow_listed_parameters_pass(native):
    """Session parameters pass; the template's own (agent_id), the agents' (signature,
    source), TTS's (output_format) and ElevenLabs' single-use token do not."""
    key = native.keys.plain["good"]
    query = (f"model_id={MODEL}&audio_format=ulaw_8000&commit_strategy=vad&vad_threshold=0.5"
             "&vad_silence_threshold_secs=1.2&min_speech_duration_ms=100&min_silence_duration_ms=200"
             "&secondary_languages=de&include_language_detection=true&no_verbatim=true"
             "&entity_detection=pii&entity_redaction=pci&entity_redaction_mode=redacted"
             "&transcript_edit=tidy&filter_background_audio=false&enable_logging=false"
             "&token=single_use&agent_id=agent_x&conversation_signature=s&source=x"
             "&output_format=pcm_16000&not_listed=1")

    async def body():
        async with connect(f"ws://127.0.0.1:{native.port}{SCRIBE}?{query}",
                           additional_headers={"xi-api-key": key}) as ws:
            started = json.loads(await ws.recv())
            await ws.send(json.dumps({"message_type": "input_audio_chunk",
                                      "audio_base_64": base64.b64encode(bytes(80)).decode(),
                                      "commit": True, "sample_rate": 8000}))
            return started, json.loads(await ws.recv())
    started, committed = run(body())
    assert started["config"]["commit_strategy"] == "vad"
    assert committed == {"message_type": "committed_transcript", "text": "80 bytes at ulaw_8000"}
    path, _ = _last_request(native, "elevenlabs")
    assert path == f"{SCRIBE}?" + query.partition("&token=")[0]


def test_wrong_or_missing_key_gets_4001(native):
    before = _requests(native)
    got, closed = _transcribe(native, "condt_wrong", [])
    assert (closed["code"], closed["reason"]) == (4001, "unknown key") and not any(
        m.get("message_type") for m in got)
    assert _closed_with(native, f"{SCRIBE}?model_id={MODEL}") == (4001, "missing key")
    # ElevenLabs' single-use token is not read: the SDK's `token` option sends it in the
    # query (and no xi-api-key), and a virtual key there is refused outright.
    with pytest.raises(InvalidStatus) as refused:
        _transcribe(native, native.keys.plain["good"], [], token=native.keys.plain["good"])
    assert refused.value.response.status_code == 400
    assert _requests(native) == before


def test_model_not_allowed_gets_4003(native):
    before = _requests(native)
    _, closed = _transcribe(native, native.keys.plain["models-only"], [])  # gpt-realtime* only
    assert (closed["code"], closed["reason"]) == (4003, f"model '{MODEL}' not allowed for this key")
    _, closed = _transcribe(native, native.keys.plain["restricted"], [])  # openai only
    assert (closed["code"], closed["reason"]) == (4003, "provider 'elevenlabs' not allowed for this key")
    assert _requests(native) == before


def test_without_model_id_gets_4004(native):
    """ElevenLabs requires model_id here (unlike TTS): the sidecar refuses first."""
    before = _requests(native)
    assert _closed_with(native, f"{SCRIBE}?audio_format=pcm_16000",
                        {"xi-api-key": native.keys.plain["good"]}) == (
        4004, "provider 'elevenlabs' needs a model")
    assert _requests(native) == before


def test_the_upstream_url_from_the_built_in_template():
    """The Scribe path replaces the agents' path, model_id the template's agent_id; a URL
    that is not the agents' path cannot serve it (4004 at the handshake)."""
    from conduit_sidecar.config import load
    from conduit_sidecar.providers import native as native_path
    from conduit_sidecar.routing import Router
    where = native_path(SCRIBE)
    assert where is not None and where.provider == "elevenlabs" and where.model_param == "model_id"
    conf = load(None, environ={}, overrides={"providers": {"elevenlabs": {"secret_env": "X"}}})
    router = Router(conf, environ={"X": "s"})
    route = router.routes["elevenlabs"]
    assert route.serves(where.kept)
    up = router.upstream(route.targets[0], MODEL, (("audio_format", "pcm_16000"),), where.kept)
    assert up.uri.resource_name == f"{SCRIBE}?model_id={MODEL}&audio_format=pcm_16000"
    assert up.headers == [("xi-api-key", "s")] and up.uri.host == "api.elevenlabs.io" and up.uri.secure
    other = load(None, environ={}, overrides={"providers": {"elevenlabs": {
        "secret_env": "X", "url": "wss://proxy.example/stt?agent_id={model}"}}})
    assert not Router(other, environ={"X": "s"}).routes["elevenlabs"].serves(where.kept)
