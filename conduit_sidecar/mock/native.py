"""Mock shapes of the non-OpenAI providers, written from each provider's API reference:

- gemini: `setup` -> `setupComplete`; `clientContent` -> one model text part, then
  `turnComplete` with `usageMetadata`. With AUDIO response modalities, as Gemini 3.x
  Live models do, one message per turn bundles the model's audio (half a second of
  24 kHz PCM16 per word), `turnComplete` and `usageMetadata`, in that (proto field)
  order. Like Google's server, JSON goes out in binary frames. On Vertex AI's path
  (`...LlmBidiService/BidiGenerateContent`) the usage names the output as Vertex's
  UsageMetadata does, `candidatesTokenCount` and `candidatesTokensDetails`. On
  `...BidiGenerateMusic` (Lyria), every message after the setup -> one `serverContent`
  audio chunk.
- deepgram, by the request path. Listen v1 (`/v1/listen`): binary audio -> `Results`
  every half second of audio; `Configure` -> `ConfigureSuccess` (naming the
  `keyterms` it gave); `CloseStream` -> `Metadata` with the `duration` received, then
  close 1000. Flux (`/v2/listen`): `Connected`; binary audio -> `TurnInfo` every half
  second of audio (`StartOfTurn`, then `Update`); `Configure` -> `ConfigureSuccess`
  naming the `thresholds` and `keyterms` in effect (each threshold and the keyterms as
  the last Configure giving them set them: the mock's turns do not change);
  `CloseStream` -> `TurnInfo` `EndOfTurn`, then
  close 1000. Speak (`/v1/speak`): `Metadata` (no duration); `Speak` text is held
  until `Flush` -> binary audio (50 ms of the URL's format per character), then
  `Flushed`; `Clear` -> `Cleared`; `Close` -> the held text's audio, then close
  1000; another message -> `Warning`. Flux TTS
  (`/v2/speak`): `Connected`; `Speak` text is held until `Flush` -> `SpeechStarted`,
  binary audio (as /v1/speak's), `SpeechMetadata` with the turn's characters, then
  `Flushed`; `Close` -> `SessionMetadata` with the session's totals, then close 1000;
  another message -> `Warning`.
- deepgram_agent (voice agent, `/v1/agent/converse`): `Welcome`; the first message must
  be `Settings` -> `SettingsApplied` (else `Error`, close 1002); binary audio ->
  `UserStartedSpeaking`, then per second of audio at `audio.input`'s format a turn:
  `ConversationText` and `History` (user: the bytes heard; assistant: an echo naming
  the think model), `AgentThinking`, `AgentStartedSpeaking`, 100 ms of binary audio
  at `audio.output`'s format, `AgentAudioDone`; `InjectUserMessage` -> that turn for
  its text; `Update{Prompt,Speak,Think,Listen}` -> `...Updated`; `KeepAlive` ->
  nothing; another message -> `Warning`.
- assemblyai (streaming v3): `Begin`; binary audio -> `Turn`; `Terminate` ->
  `Termination` with `audio_duration_seconds`, then close 1000.
- elevenlabs (conversational AI): `conversation_initiation_client_data` ->
  `conversation_initiation_metadata`; `user_message` -> `agent_response`. Its REST
  `GET /v1/convai/conversation/get-signed-url` hands out signed URLs; a session with a
  `conversation_signature` it did not issue is refused with HTTP 403, and so is a
  session with neither signature nor `xi-api-key` for an agent that is not public
  (public agents here: ids starting with `agent_public`).
- elevenlabs (text to speech, `/v1/text-to-speech/{voice_id}/stream-input`): the first
  message opens the stream (`text` a single space, with `voice_settings` and
  `generation_config`); text is buffered and voiced on `try_trigger_generation`,
  `flush` or the closing `{"text": ""}`: `{"audio": <base64>, "isFinal": null,
  "normalizedAlignment": ..., "alignment": ...}` per chunk, then `{"isFinal": true}`
  and close 1000. The mock's "audio" is the text's UTF-8 bytes, so a test can tell
  what was voiced. `multi-stream-input` does the same per `context_id` (audio and
  final messages carry `contextId`; `flush`, `close_context`, `close_socket`).
- elevenlabs (realtime speech to text, `/v1/speech-to-text/realtime`): `session_started`
  with the URL's session config; each `input_audio_chunk` (base64 audio in JSON) ->
  `partial_transcript` of the bytes heard so far; one with `commit` ->
  `committed_transcript` (and `committed_transcript_with_timestamps` when the URL has
  `include_timestamps=true`) naming the bytes and `audio_format`, and the count starts
  again; anything else -> `input_error`. It commits on `commit` only, whatever
  `commit_strategy` says.
"""

from __future__ import annotations

import base64
import http
import itertools
import secrets
import urllib.parse

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Response

__all__ = ["REST", "SHAPES", "speech_to_text", "text_to_speech"]

_json = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode


def _query(ws: ServerConnection) -> dict[str, str]:
    assert ws.request is not None  # the handshake is done
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(ws.request.path).query))


async def gemini(ws: ServerConnection) -> None:
    setup = _json.decode(await ws.recv(decode=False)).get("setup")
    if not isinstance(setup, dict) or not setup.get("model"):
        await ws.close(1007, "first message must be setup")
        return
    await ws.send(_encode({"setupComplete": {}}))
    assert ws.request is not None  # the handshake is done
    if "BidiGenerateMusic" in ws.request.path:
        # Lyria: 10 ms of 48 kHz stereo PCM16 for every message.
        data = base64.b64encode(bytes(1920)).decode()
        chunk = {"data": data, "mimeType": "audio/l16;rate=48000;channels=2"}
        async for _ in ws:
            await ws.send(_encode({"serverContent": {"audioChunks": [chunk]}}))
        return
    config = setup.get("generationConfig") or setup.get("generation_config") or {}
    audio = "AUDIO" in (config.get("responseModalities") or config.get("response_modalities") or ())
    output = "candidates" if "LlmBidiService" in ws.request.path else "response"
    async for message in ws:
        # Proto JSON: Google's servers take lowerCamel and snake_case field names alike.
        event = _json.decode(message)
        content = event.get("clientContent") or event.get("client_content") or {}
        text = " ".join(p.get("text", "") for t in content.get("turns", []) for p in t.get("parts", []))
        n = len(text.split())
        if audio:
            pcm = base64.b64encode(bytes(24000 * n)).decode()
            part = {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": pcm}}
            usage = {
                "promptTokenCount": n + 3,
                f"{output}TokenCount": 16 * n,  # 32 tokens a second of audio
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": n + 3}],
                f"{output}TokensDetails": [{"modality": "AUDIO", "tokenCount": 16 * n}],
            }
            turn = {"modelTurn": {"parts": [part]}, "turnComplete": True}
            await ws.send(_encode({"serverContent": turn, "usageMetadata": usage}))
            continue
        await ws.send(_encode({"serverContent": {"modelTurn": {"parts": [{"text": f"echo: {text}"}]}}}))
        if content.get("turnComplete") or content.get("turn_complete"):
            await ws.send(
                _encode(
                    {
                        "serverContent": {"turnComplete": True},
                        "usageMetadata": {
                            "promptTokenCount": n + 3,
                            f"{output}TokenCount": n + 1,
                            "totalTokenCount": 2 * n + 4,
                            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": n + 3}],
                            f"{output}TokensDetails": [{"modality": "TEXT", "tokenCount": n + 1}],
                        },
                    }
                )
            )


def _object(message: str | bytes) -> dict:
    """A client's JSON message as an object; {} for anything else (the mocks answer it
    with their error event)."""
    try:
        event = _json.decode(message)
    except msgspec.DecodeError:
        return {}
    return event if isinstance(event, dict) else {}


def _bytes_per_second(q: dict[str, str]) -> int:
    width = 2 if q.get("encoding", "linear16") in ("linear16", "pcm_s16le") else 1
    return int(q.get("sample_rate", 16000)) * int(q.get("channels", 1)) * width


async def deepgram(ws: ServerConnection) -> None:
    assert ws.request is not None  # the handshake is done
    path = urllib.parse.urlsplit(ws.request.path).path
    if path.endswith("/v2/listen"):
        await _flux(ws)
    elif path.endswith("/v1/speak"):
        await _speak(ws)
    elif path.endswith("/v2/speak"):
        await _speak_v2(ws)
    else:
        await _listen(ws)


async def _listen(ws: ServerConnection) -> None:
    q = _query(ws)
    per_second = _bytes_per_second(q)
    received = reported = 0
    request_id = secrets.token_hex(8)
    async for message in ws:
        if isinstance(message, bytes):
            received += len(message)
            if received - reported >= per_second // 2:
                start, reported = reported / per_second, received
                await ws.send(
                    _encode(
                        {
                            "type": "Results",
                            "channel_index": [0, 1],
                            "start": start,
                            "duration": received / per_second - start,
                            "is_final": True,
                            "speech_final": True,
                            "channel": {
                                "alternatives": [
                                    {
                                        "transcript": f"{received} bytes at "
                                        f"{q.get('encoding')}/{q.get('sample_rate')}",
                                        "confidence": 0.99,
                                        "words": [],
                                    }
                                ]
                            },
                            "metadata": {
                                "request_id": request_id,
                                "model_uuid": "mock",
                                "model_info": {"name": q.get("model", ""), "version": "mock", "arch": "mock"},
                            },
                        }
                    ).decode()
                )
        elif (event := _json.decode(message)).get("type") == "Configure":
            success = {"type": "ConfigureSuccess", "request_id": request_id}
            if event.get("keyterms") is not None:  # named only when the update replaced them
                success["keyterms"] = event["keyterms"]
            await ws.send(_encode(success).decode())
        elif event.get("type") == "CloseStream":
            await ws.send(
                _encode(
                    {
                        "type": "Metadata",
                        "transaction_key": "deprecated",
                        "request_id": request_id,
                        "sha256": "0" * 64,
                        "created": "2026-01-01T00:00:00.000Z",
                        "duration": received / per_second,
                        "channels": int(q.get("channels", 1)),
                    }
                ).decode()
            )
            await ws.close(1000)
            return


async def _flux(ws: ServerConnection) -> None:
    q = _query(ws)
    per_second = _bytes_per_second(q)
    request_id = secrets.token_hex(8)
    sequence = itertools.count()
    received = reported = 0
    connected = {"type": "Connected", "request_id": request_id, "sequence_id": next(sequence)}
    await ws.send(_encode(connected).decode())
    thresholds: dict = {}  # each as the last Configure giving it set it
    keyterms: list = []  # as the last Configure giving them set them

    def turn(event: str) -> str:
        fields = {
            "type": "TurnInfo",
            "request_id": request_id,
            "sequence_id": next(sequence),
            "event": event,
            "turn_index": 0,
            "audio_window_start": 0.0,
            "audio_window_end": received / per_second,
            "transcript": f"{received} bytes at {q.get('encoding')}/{q.get('sample_rate')}",
            "words": [],
            "end_of_turn_confidence": 0.9 if event == "EndOfTurn" else 0.1,
        }
        return _encode({**fields, "trigger": "model"} if event == "EndOfTurn" else fields).decode()

    async for message in ws:
        if isinstance(message, bytes):
            received += len(message)
            if received - reported >= per_second // 2:
                await ws.send(turn("Update" if reported else "StartOfTurn"))
                reported = received
        elif (sent := _json.decode(message)).get("type") == "Configure":
            thresholds.update(sent.get("thresholds") or {})
            if sent.get("keyterms") is not None:
                keyterms = sent["keyterms"]
            success = {"type": "ConfigureSuccess", "request_id": request_id, "sequence_id": next(sequence)}
            await ws.send(_encode({**success, "thresholds": thresholds, "keyterms": keyterms}).decode())
        elif sent.get("type") == "CloseStream":
            await ws.send(turn("EndOfTurn"))
            await ws.close(1000)
            return


async def _speak(ws: ServerConnection) -> None:
    q = _query(ws)
    per_character = _bytes_per_second({"sample_rate": "24000", **q}) // 20
    flushes = itertools.count()
    held = ""
    metadata = {
        "type": "Metadata",
        "request_id": secrets.token_hex(8),
        "model_name": q.get("model", ""),
        "model_version": "mock",
        "model_uuid": "mock",
    }
    await ws.send(_encode(metadata).decode())
    async for message in ws:
        event = _object(message)
        kind = event.get("type")
        if kind == "Speak":
            held += str(event.get("text", ""))
            continue
        if kind not in ("Flush", "Clear", "Close"):
            warning = {"type": "Warning", "description": f"unknown message type {kind!r}", "code": "UNKNOWN"}
            await ws.send(_encode(warning).decode())
            continue
        if kind != "Clear" and held:
            await ws.send(bytes(len(held) * per_character))
        held = ""
        if kind == "Close":
            await ws.close(1000)
            return
        await ws.send(_encode({"type": kind + "ed", "sequence_id": next(flushes)}).decode())


async def _speak_v2(ws: ServerConnection) -> None:
    q = _query(ws)
    per_character = _bytes_per_second({"sample_rate": "24000", **q}) // 20
    turns = itertools.count()
    held = ""
    total = {
        "total_audio_duration_ms": 0,
        "total_input_character_count": 0,
        "total_billable_character_count": 0,
    }
    connected = {
        "type": "Connected",
        "request_id": secrets.token_hex(8),
        "model_name": q.get("model", ""),
        "model_version": "mock",
        "model_uuids": ["mock"],
    }
    await ws.send(_encode(connected).decode())
    async for message in ws:
        event = _object(message)
        kind = event.get("type")
        if kind == "Speak":
            held += str(event.get("text", ""))
        elif kind == "Flush":
            speech_id = f"dg_sp_{next(turns):012x}"
            await ws.send(_encode({"type": "SpeechStarted", "speech_id": speech_id}).decode())
            if held:
                await ws.send(bytes(len(held) * per_character))
            turn = {
                "audio_duration_ms": len(held) * 50,
                "input_character_count": len(held),
                "billable_character_count": len(held),
            }
            for name, n in turn.items():
                total["total_" + name] += n
            controls = {"pronunciations_applied": 0, "breaks_applied": 0, "pronunciation_warnings": 0}
            metadata = {
                "type": "SpeechMetadata",
                "speech_id": speech_id,
                **turn,
                "controls_applied": controls,
            }
            await ws.send(_encode(metadata).decode())
            await ws.send(_encode({"type": "Flushed", "speech_id": speech_id}).decode())
            held = ""
        elif kind == "Close":
            await ws.send(_encode({"type": "SessionMetadata", **total}).decode())
            await ws.close(1000)
            return
        else:
            warning = {"type": "Warning", "code": "UNKNOWN", "description": f"unknown message type {kind!r}"}
            await ws.send(_encode(warning).decode())


def _agent_rate(audio: dict) -> int:
    width = 2 if audio.get("encoding", "linear16") == "linear16" else 1
    return int(audio.get("sample_rate", 24000)) * width


async def deepgram_agent(ws: ServerConnection) -> None:
    await ws.send(_encode({"type": "Welcome", "request_id": secrets.token_hex(8)}).decode())
    settings = _object(await ws.recv(decode=False))
    if settings.get("type") != "Settings":
        error = {"type": "Error", "code": "UNPARSABLE_CLIENT_MESSAGE", "description": "expected Settings"}
        await ws.send(_encode(error).decode())
        await ws.close(1002, "expected Settings")
        return
    await ws.send(_encode({"type": "SettingsApplied"}).decode())
    audio = settings.get("audio") or {}
    per_second, out_rate = _agent_rate(audio.get("input") or {}), _agent_rate(audio.get("output") or {})
    agent = settings.get("agent")
    think = (agent.get("think") if isinstance(agent, dict) else None) or {}
    first = think[0] if isinstance(think, list) else think
    think_model = first.get("provider", {}).get("model")

    async def turn(heard: str) -> None:
        for role, content in (("user", heard), ("assistant", f"{think_model} heard: {heard}")):
            await ws.send(_encode({"type": "ConversationText", "role": role, "content": content}).decode())
            await ws.send(_encode({"type": "History", "role": role, "content": content}).decode())
        await ws.send(_encode({"type": "AgentThinking", "content": "mock"}).decode())
        latency = {"total_latency": 0.2, "tts_latency": 0.1, "ttt_latency": 0.1}
        await ws.send(_encode({"type": "AgentStartedSpeaking", **latency}).decode())
        await ws.send(bytes(out_rate // 10))
        await ws.send(_encode({"type": "AgentAudioDone"}).decode())

    received = reported = 0
    async for message in ws:
        if isinstance(message, bytes):
            if not received:
                await ws.send(_encode({"type": "UserStartedSpeaking"}).decode())
            received += len(message)
            if received - reported >= per_second:
                reported = received
                await turn(f"{received} bytes")
            continue
        event = _json.decode(message)
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "InjectUserMessage":
            await turn(str(event.get("content", "")))
        elif kind in ("UpdatePrompt", "UpdateSpeak", "UpdateThink", "UpdateListen"):
            await ws.send(_encode({"type": kind.removeprefix("Update") + "Updated"}).decode())
        elif kind != "KeepAlive":
            warning = {"type": "Warning", "code": "UNKNOWN", "description": f"unknown message type {kind!r}"}
            await ws.send(_encode(warning).decode())


async def assemblyai(ws: ServerConnection) -> None:
    per_second = int(_query(ws).get("sample_rate", 16000)) * 2
    await ws.send(_encode({"type": "Begin", "id": secrets.token_hex(8), "expires_at": 4102444800}).decode())
    received, turn = 0, 0
    async for message in ws:
        if isinstance(message, bytes):
            received += len(message)
            if received // per_second > turn:
                await ws.send(
                    _encode(
                        {
                            "type": "Turn",
                            "turn_order": turn,
                            "turn_is_formatted": True,
                            "end_of_turn": True,
                            "transcript": f"{received} bytes",
                            "end_of_turn_confidence": 0.9,
                            "words": [],
                        }
                    ).decode()
                )
                turn += 1
        elif _json.decode(message).get("type") == "Terminate":
            seconds = round(received / per_second)  # whole seconds, like the API
            await ws.send(
                _encode(
                    {
                        "type": "Termination",
                        "audio_duration_seconds": seconds,
                        "session_duration_seconds": seconds,
                    }
                ).decode()
            )
            await ws.close(1000)
            return


def _voiced(text: str, context: str | None = None) -> bytes:
    """One audio chunk of `text`, as ElevenLabs sends it (alignment per character)."""
    chars = list(text)
    alignment = {
        "charStartTimesMs": [10 * i for i in range(len(chars))],
        "charDurationsMs": [10] * len(chars),
        "chars": chars,
    }
    event: dict = {
        "audio": base64.b64encode(text.encode()).decode(),
        "isFinal": None,
        "normalizedAlignment": alignment,
        "alignment": alignment,
    }
    if context is not None:
        event["contextId"] = context
    return _encode(event)


def _final(context: str | None = None) -> bytes:
    return _encode({"isFinal": True} if context is None else {"isFinal": True, "contextId": context})


async def text_to_speech(ws: ServerConnection, first_messages: list[bytes]) -> None:
    """`stream-input` and `multi-stream-input`; the first message is kept in
    `first_messages` (tests check what reached the provider)."""
    assert ws.request is not None  # the handshake is done
    multi = urllib.parse.urlsplit(ws.request.path).path.endswith("/multi-stream-input")
    buffers: dict[str | None, str] = {}  # text not voiced yet, per open context
    first = True
    async for message in ws:
        raw = message.encode() if isinstance(message, str) else message
        event = _json.decode(raw)
        text = event.get("text")
        if first:
            first_messages.append(raw)
            first = False
            if text != " ":
                await ws.close(1008, "the first message must be a single space")
                return
        context = event.get("context_id", "default") if multi else None
        # A stream ends with empty text; a context with close_context (empty text only
        # keeps it alive), every context with close_socket.
        if multi and event.get("close_socket"):
            ending = list(buffers)
        else:
            buffers.setdefault(context, "")
            if text and text.strip():  # not the single space that opens a context
                buffers[context] += text
            ending = [context] if event.get("close_context") or (text == "" and not multi) else []
        voicing = [context] if event.get("try_trigger_generation") or event.get("flush") else []
        for c in dict.fromkeys(voicing + ending):
            if buffers.get(c):
                await ws.send(_voiced(buffers[c], c).decode())
                buffers[c] = ""
        for c in ending:
            await ws.send(_final(c).decode())
            del buffers[c]
        if (ending and not multi) or (multi and event.get("close_socket")):
            await ws.close(1000)
            return


async def speech_to_text(ws: ServerConnection) -> None:
    q = _query(ws)
    audio_format = q.get("audio_format", "pcm_16000")
    sample_rate = int(audio_format.rpartition("_")[2])
    per_second = sample_rate * (1 if audio_format.startswith("ulaw") else 2)
    config = {
        "sample_rate": sample_rate,
        "audio_format": audio_format,
        "language_code": q.get("language_code"),
        "commit_strategy": q.get("commit_strategy", "manual"),
        "model_id": q.get("model_id"),
        "include_timestamps": q.get("include_timestamps") == "true",
    }
    started = {"message_type": "session_started", "session_id": secrets.token_hex(8), "config": config}
    await ws.send(_encode(started).decode())
    heard = 0
    async for message in ws:
        event = _object(message)
        if event.get("message_type") != "input_audio_chunk":
            error = {"message_type": "input_error", "error": "expected input_audio_chunk"}
            await ws.send(_encode(error).decode())
            continue
        heard += len(base64.b64decode(event.get("audio_base_64") or ""))
        text = f"{heard} bytes at {audio_format}"
        if not event.get("commit"):
            await ws.send(_encode({"message_type": "partial_transcript", "text": text}).decode())
            continue
        await ws.send(_encode({"message_type": "committed_transcript", "text": text}).decode())
        if config["include_timestamps"]:
            word = {"text": text, "start": 0.0, "end": heard / per_second, "type": "word"}
            timed = {
                "message_type": "committed_transcript_with_timestamps",
                "text": text,
                "language_code": config["language_code"] or "en",
                "words": [word],
            }
            await ws.send(_encode(timed).decode())
        heard = 0


PUBLIC_AGENTS = "agent_public"  # the prefix of the agents anyone may talk to


async def elevenlabs(ws: ServerConnection) -> None:
    async for message in ws:
        event = _json.decode(message)
        kind = event.get("type")
        if kind == "conversation_initiation_client_data":
            await ws.send(
                _encode(
                    {
                        "type": "conversation_initiation_metadata",
                        "conversation_initiation_metadata_event": {
                            "conversation_id": "conv_" + secrets.token_hex(4),
                            "agent_output_audio_format": "pcm_16000",
                            "user_input_audio_format": "pcm_16000",
                        },
                    }
                ).decode()
            )
        elif kind == "user_message":
            await ws.send(
                _encode(
                    {
                        "type": "agent_response",
                        "agent_response_event": {"agent_response": f"echo: {event.get('text', '')}"},
                    }
                ).decode()
            )
        elif kind == "ping":
            await ws.send(
                _encode({"type": "pong", "event_id": event.get("ping_event", {}).get("event_id", 0)}).decode()
            )


def elevenlabs_rest(mock, connection, request):
    """`get-signed-url`: a URL to this mock with a fresh signature; a session whose
    signature this mock did not issue is refused (each mock is its own account)."""
    url = urllib.parse.urlsplit(request.path)
    q = dict(urllib.parse.parse_qsl(url.query))
    if "upgrade" in request.headers.get("Connection", "").lower():
        signature = q.get("conversation_signature")
        if signature is not None and signature not in mock.issued:
            return connection.respond(http.HTTPStatus.FORBIDDEN, "bad signature\n")
        public = q.get("agent_id", "").startswith(PUBLIC_AGENTS)
        if signature is None and "xi-api-key" not in request.headers and not public:
            return connection.respond(http.HTTPStatus.FORBIDDEN, "this agent requires authorization\n")
        return None
    if url.path == "/v1/convai/conversation/get-signed-url" and q.get("agent_id"):
        signature = secrets.token_urlsafe(16)
        mock.issued.add(signature)
        signed = f"{mock.url}/v1/convai/conversation?" + urllib.parse.urlencode(
            {"agent_id": q["agent_id"], "conversation_signature": signature}
        )
        body = _encode({"signed_url": signed})
        return Response(
            200,
            "OK",
            Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))]),
            body,
        )
    return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")


SHAPES = {
    "gemini": gemini,
    "deepgram": deepgram,
    "deepgram_agent": deepgram_agent,
    "assemblyai": assemblyai,
    "elevenlabs": elevenlabs,
}
REST = {"elevenlabs": elevenlabs_rest}
