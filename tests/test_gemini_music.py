"""Lyria's realtime music (google-genai's `client.aio.live.music`), through the sidecar
to the gemini mock: the SDK dials `...GenerativeService.BidiGenerateMusic` with its key
in `x-goog-api-key` and names the model in its first message, a `setup` held and
checked as Gemini's is; upstream it is the same method at the same API version, with
the provider's key."""

from __future__ import annotations

import urllib.parse

import pytest
from websockets.exceptions import ConnectionClosed

from conftest import PROVIDER_SECRET, run
# The fixtures too: this module gets its own sidecar and mocks, configured as theirs.
from test_native_sdks import _last_request, last_session, log_mark, native, node, sidecar_ca_bundle  # noqa: F401

UPSTREAM = ("/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateMusic"
            "?key=" + urllib.parse.quote(PROVIDER_SECRET, safe=""))


def _play(native, key_id: str, model: str = "models/lyria-realtime-exp") -> list[int]:
    """Prompts, play, and the sizes of the first two audio chunks (over the TLS listener:
    google-genai dials wss:// only)."""
    from google import genai
    from google.genai import types
    client = genai.Client(api_key=native.keys.plain[key_id], http_options={
        "base_url": f"https://127.0.0.1:{native.tls_port}", "api_version": "v1alpha"})

    async def body():
        sizes = []
        async with client.aio.live.music.connect(model=model) as session:
            await session.set_weighted_prompts(prompts=[types.WeightedPrompt(text="piano", weight=1.0)])
            await session.play()
            async for message in session.receive():
                sizes += [len(c.data) for c in message.server_content.audio_chunks]
                if len(sizes) == 2:
                    break
        return sizes
    return run(body())


def test_the_sdk_plays_through_the_sidecar(native, sidecar_ca_bundle):
    mark = log_mark(native)
    assert _play(native, "good") == [1920, 1920]
    path, headers = _last_request(native, "gemini")
    assert path == UPSTREAM                      # the method and the API version kept
    key = native.keys.plain["good"]
    assert key not in path and key not in str(headers.raw_items()) and "x-goog-api-key" not in headers
    end = last_session(native, "gemini", mark)
    assert (end["key_id"], end["model"]) == ("good", "lyria-realtime-exp")


def test_a_model_the_key_does_not_allow_gets_4003(native, sidecar_ca_bundle):
    before = len(native.mocks["gemini"].mock.requests)
    with pytest.raises(ConnectionClosed) as exc:   # the SDK reads the setup's answer itself
        _play(native, "gemini-flash")
    closed = exc.value.rcvd
    assert (closed.code, closed.reason) == (4003, "model 'lyria-realtime-exp' not allowed for this key")
    assert len(native.mocks["gemini"].mock.requests) == before   # the provider never asked


def test_the_node_sdk_plays_through_the_sidecar(native):
    key = native.keys.plain["good"]
    out = node("gemini_music_test.mjs", f"http://127.0.0.1:{native.port}", key, "models/lyria-realtime-exp")
    assert out["chunks"] == [1920, 1920] and "error" not in out, out   # then its close, code-less
    path, headers = _last_request(native, "gemini")
    assert path == UPSTREAM and key not in str(headers.raw_items())   # its ?key= replaced


def test_the_node_sdk_with_a_model_the_key_does_not_allow_gets_4003(native):
    out = node("gemini_music_test.mjs", f"http://127.0.0.1:{native.port}",
               native.keys.plain["gemini-flash"], "models/lyria-realtime-exp")
    assert out["chunks"] == [] and out["close"] == [4003, "model 'lyria-realtime-exp' not allowed for this key"], out
