"""Per-provider usage decoders (metering.py). End to end: test_operations (OpenAI,
malformed events) and test_native_sdks (each provider's mock)."""

from __future__ import annotations

import json

import pytest

from conduit_sidecar import metering
from conduit_sidecar.metering import METERS, MalformedUsage

openai, gemini = METERS["openai"].decode, METERS["gemini"].decode
deepgram, assemblyai = METERS["deepgram"].decode, METERS["assemblyai"].decode


def done(usage) -> bytes:
    return json.dumps({"type": "response.done", "response": {"usage": usage}}).encode()


def test_openai_details_are_counted_once():
    # cached_tokens_details breaks cached_tokens down (and cached tokens are also in
    # text/audio): the totals, the top-level details, and the audio part of the cached
    # tokens (priced apart) are counted.
    counts = openai(done({
        "total_tokens": 330, "input_tokens": 300, "output_tokens": 30,
        "input_token_details": {"text_tokens": 120, "audio_tokens": 170, "image_tokens": 10,
                                "cached_tokens": 100,
                                "cached_tokens_details": {"text_tokens": 60, "audio_tokens": 40,
                                                          "image_tokens": 0}},
        "output_token_details": {"text_tokens": 10, "audio_tokens": 20}}))
    assert counts == {"input": 300, "output": 30, "input_text": 120, "input_audio": 170,
                      "input_image": 10, "input_cached": 100, "input_cached_audio": 40,
                      "input_cached_image": 0, "output_text": 10, "output_audio": 20}


def test_openai_transcription_usage_tokens_and_duration():
    kind = "conversation.item.input_audio_transcription.completed"
    tokens = openai(json.dumps({"type": kind, "transcript": "hi", "usage": {
        "type": "tokens", "input_tokens": 14, "output_tokens": 4, "total_tokens": 18,
        "input_token_details": {"text_tokens": 0, "audio_tokens": 14}}}).encode())
    assert tokens["input"] == 14 and tokens["input_audio"] == 14 and tokens["output"] == 4
    assert openai(json.dumps({"type": kind, "usage": {"type": "duration", "seconds": 2.5}})
                  .encode()) == {"audio": 2.5}


def test_openai_session_events_name_the_transcription_model():
    """session.created / session.updated echo the session: its transcription model is
    what its transcription usage is billed at. One that could not be a label (a virtual
    key, a control character) is not taken."""
    named = METERS["openai"].transcriber

    def updated(transcription, kind="session.updated"):
        return json.dumps({"type": kind, "session": {"audio": {"input": {"transcription": transcription}}}}).encode()
    assert named(updated({"model": "gpt-4o-transcribe"})) == "gpt-4o-transcribe"
    assert named(updated({"model": "whisper-1"}, "session.created")) == "whisper-1"
    beta = {"type": "session.updated", "session": {"input_audio_transcription": {"model": "whisper-1"}}}
    assert named(json.dumps(beta).encode()) == "whisper-1"
    for transcription in (None, {"model": "condt_" + "x" * 40}, {"model": "a\nb"}, {"model": ""}):
        assert named(updated(transcription)) is None
    assert named(done({"input_tokens": 1})) is None


def test_gemini_usage_metadata_per_modality():
    counts = gemini(json.dumps({"serverContent": {"turnComplete": True}, "usageMetadata": {
        "promptTokenCount": 30, "responseTokenCount": 12, "totalTokenCount": 42,
        "cachedContentTokenCount": 4,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 10},
                                {"modality": "AUDIO", "tokenCount": 20}],
        "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": 12}]}}).encode())
    assert counts["input"] == 30 and counts["output"] == 12 and counts["input_cached"] == 4
    assert counts["input_text"] == 10 and counts["input_audio"] == 20
    assert counts["output_audio"] == 12 and counts["output_text"] == 0


def test_gemini_tokens_without_their_details_are_priced_as_text():
    """A count sent without its per-modality details was in `input`/`output` but in
    no priced kind: it cost nothing."""
    counts = gemini(json.dumps({"usageMetadata": {
        "promptTokenCount": 1000, "toolUsePromptTokenCount": 300, "responseTokenCount": 200,
        "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 1000}]}}).encode())
    assert (counts["input"], counts["input_audio"], counts["input_text"]) == (1300, 1000, 300)
    assert (counts["output"], counts["output_text"]) == (200, 200)


def test_gemini_tool_use_and_thoughts_are_counted_and_cached_audio_told_apart():
    """Gemini's total is prompt + response + tool-use prompt + thoughts; the last two
    were dropped (1,200 of 2,300 tokens counted here), and cached audio was never
    told from cached text."""
    counts = gemini(json.dumps({"usageMetadata": {
        "promptTokenCount": 1000, "responseTokenCount": 200, "toolUsePromptTokenCount": 300,
        "thoughtsTokenCount": 800, "totalTokenCount": 2300, "cachedContentTokenCount": 600,
        "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 1000}],
        "toolUsePromptTokensDetails": [{"modality": "TEXT", "tokenCount": 300}],
        "cacheTokensDetails": [{"modality": "AUDIO", "tokenCount": 500}, {"modality": "TEXT", "tokenCount": 100}],
        "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": 200}]}}).encode())
    assert counts["input"] + counts["output"] == 2300
    assert (counts["input_audio"], counts["input_text"]) == (1000, 300)
    assert (counts["output_audio"], counts["output_text"]) == (200, 800)
    assert (counts["input_cached"], counts["input_cached_audio"]) == (600, 500)


def test_gemini_cached_images_are_told_apart():
    """cacheTokensDetails' IMAGE (and VIDEO) tokens are the image part of the cached
    input (google-genai types.UsageMetadata.cache_tokens_details, ModalityTokenCount
    per MediaModality); they were left out, so prices took them for cached text."""
    counts = gemini(json.dumps({"usageMetadata": {
        "promptTokenCount": 1300, "cachedContentTokenCount": 1100,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 100}, {"modality": "IMAGE", "tokenCount": 1000},
                                {"modality": "VIDEO", "tokenCount": 200}],
        "cacheTokensDetails": [{"modality": "IMAGE", "tokenCount": 1000}, {"modality": "VIDEO", "tokenCount": 100}]}}).encode())
    assert (counts["input_image"], counts["input_cached"], counts["input_cached_image"]) == (1200, 1100, 1100)


def test_gemini_usage_is_the_top_level_marker_after_nested_ones():
    """The relay hands a Gemini message over from its first marker on: one the client
    can place in the content (a text part, its own tool's argument) comes first, and
    must not hide the usage after it."""
    usage = {"promptTokenCount": 7, "responseTokenCount": 2}
    message = json.dumps({
        "toolCall": {"functionCalls": [{"name": "f", "args": {"usageMetadata": {"promptTokenCount": 1}}}]},
        "serverContent": {"modelTurn": {"parts": [{"text": "usageMetadata"}]}},
        "usageMetadata": usage}).encode()
    for tail in (message, message[message.index(b'"usageMetadata"'):]):
        counts = gemini(tail)
        assert (counts["input"], counts["output"]) == (7, 2)
    nested_only = json.dumps({"toolCall": {"functionCalls": [{"args": {"usageMetadata": {"promptTokenCount": 1}}}]}})
    assert gemini(nested_only[nested_only.index('"usageMetadata"'):].encode()) is None


def test_gemini_usage_search_tries_few_markers(monkeypatch):
    """Each try parses up to the rest of the message, so trying every marker of one
    with a marker at every turn (nested in the content a client can steer, or from a
    provider) was quadratic: 300 KB of them took seconds of the event loop, 4 MiB
    minutes. The last marker and the first are tried (the usage after the content or
    before it), and a few more before the last; past those a message is malformed."""
    tries = []

    class Counting:
        def decode(self, buf):
            tries.append(len(buf))
            return decoder.decode(buf)

    decoder = metering._gemini
    monkeypatch.setattr(metering, "_gemini", Counting())
    usage = b'"usageMetadata":{"promptTokenCount":7,"responseTokenCount":2}'
    nested = b'"toolCall":{"functionCalls":[' + b",".join([b'{"args":{"usageMetadata":{}}}'] * 1000) + b"]}"
    for message in (usage + b"," + nested + b"}", b'{"serverContent":{}, ' + nested + b"," + usage + b"}"):
        tries.clear()
        counts = gemini(message[message.index(b'"usageMetadata"'):])
        assert (counts["input"], counts["output"]) == (7, 2) and len(tries) <= metering._GEMINI_TRIES
    tries.clear()
    with pytest.raises(MalformedUsage):     # no try parses: a closer is over at the end
        gemini(b'"usageMetadata":{},' * 5000 + b'"x":1}}')
    assert len(tries) == metering._GEMINI_TRIES


def test_audio_seconds_of_deepgram_and_assemblyai():
    assert deepgram(b'{"type":"Metadata","duration":3.25,"channels":1}') == {"audio": 3.25}
    # AssemblyAI bills the session's open time, idle included; the audio where that is absent.
    assert assemblyai(b'{"type":"Termination","audio_duration_seconds":7,'
                      b'"session_duration_seconds":8}') == {"audio": 8}
    assert assemblyai(b'{"type":"Termination","audio_duration_seconds":7}') == {"audio": 7}


@pytest.mark.parametrize("decode,message", [
    (openai, b'{"type":"response.output_text.delta","delta":"\\"response.done\\""}'),
    (openai, b'"response.done" but not JSON we know'),
    (gemini, b'{"serverContent":{"modelTurn":{"parts":[{"text":"usageMetadata"}]}}}'),
    (deepgram, b'{"type":"Results","channel":{"alternatives":[{"transcript":"Metadata"}]}}'),
    # Speak's first message: no duration, nothing billed by it (Speak bills characters).
    (deepgram, b'{"type":"Metadata","request_id":"r","model_name":"aura-2-thalia-en",'
               b'"model_version":"1","model_uuid":"u"}'),
    (assemblyai, b'{"type":"Turn","transcript":"Termination"}'),
])
def test_a_marker_in_other_messages_is_not_usage(decode, message):
    assert decode(message) is None


@pytest.mark.parametrize("decode,message", [
    (openai, done({"input_tokens": -5})),
    (openai, done({"input_tokens": 10 ** 12})),
    (openai, done({"input_tokens": "many"})),
    (openai, done({"input_token_details": {"audio_tokens": -1}})),
    (openai, b'{"type":"conversation.item.input_audio_transcription.completed",'
             b'"usage":{"type":"duration","seconds":-1}}'),
    # A usage type not known: neither tokens nor seconds can be trusted from it.
    (openai, b'{"type":"conversation.item.input_audio_transcription.completed",'
             b'"usage":{"type":"characters","seconds":9}}'),
    (gemini, b'{"usageMetadata":{"promptTokenCount":-1}}'),
    (gemini, b'{"usageMetadata":[1,2]}'),
    (deepgram, b'{"type":"Metadata","duration":-3}'),
    (deepgram, b'{"type":"Metadata","duration":1e30}'),
    (assemblyai, b'{"type":"Termination","audio_duration_seconds":"long"}'),
])
def test_malformed_usage_is_refused(decode, message):
    with pytest.raises(MalformedUsage):
        decode(message)
