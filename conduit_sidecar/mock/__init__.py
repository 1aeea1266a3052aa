"""Mock providers: real WebSocket servers speaking each provider's event shapes, for
the demo, tests and benchmarks. No network beyond loopback. `MockProvider(shape=...)`:
"openai" (also Azure's), or one of `native.SHAPES` (gemini, deepgram, deepgram_agent,
assemblyai, elevenlabs). The OpenAI Realtime GA shape:

- `session.created` right after the handshake;
- `session.update` -> `session.updated`;
- `input_audio_buffer.append` -> `response.output_audio.delta` (the same audio back)
  and, on `input_audio_buffer.commit` or `response.create`, `response.done` with a
  `usage` object counting what was received (`response.create` first gets
  `response.created`: agent SDKs end a turn only on a response they saw start; both
  carry the request's `metadata`);
- `conversation.item.create` -> `conversation.item.added` and `conversation.item.done`
  with the item (given an id if it had none);
- binary frames are echoed; text that is not a known JSON event is echoed verbatim.

A transcription session (`?intent=transcription`, no `model`: with one, OpenAI opens a
conversation session, as LiveKit's STT plugin notes) instead starts with a
`session.created` of type `transcription`, answers `session.update` (GA) and
`transcription_session.update` (beta), and on `input_audio_buffer.commit` sends
`input_audio_buffer.committed`, a transcription `delta` and `completed` with `usage`:
of type `duration` (`seconds` received) when the model named is `whisper-1`, else of
type `tokens` (10 audio tokens a second). An update naming a transcription model
OpenAI does not offer gets an `error` (`invalid_value`) and changes nothing, as
OpenAI's does.

A translation session (path `.../realtime/translations`) starts with a `session.created`
of type `translation` naming the URL's model, answers `session.update` with
`session.updated`, `session.input_audio_buffer.append` with `session.output_audio.delta`
(the same audio back), and `session.close` with `session.closed`. Its events carry no
usage, as OpenAI's do not.

A Live session (path `.../live/sessions`) waits for `session.start` and answers it with
`session.started` (the session's `model` as the client named it); each
`session.input_audio.append` gets `session.output_audio.delta` (the same audio back)
and `session.usage.updated` with the session's billable seconds so far (pcm16 at
24 kHz), cumulative as OpenAI reports them; `session.close` gets `session.closed` with
the same total. A fork (`.../live/sessions/ID/fork`) is the same, its model
`gpt-live-1` (inherited); a sideband (`.../ID/attach`) takes no session.start and
starts with `session.usage.updated` of the session it joins (5 s so far).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import urllib.parse

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers

from . import native

__all__ = ["SHAPES", "MockProvider"]

_ids = itertools.count(1)
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class MockProvider:
    """`async with MockProvider() as mock:` then `mock.url` ('ws://127.0.0.1:PORT')."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ssl=None, shape: str = "openai"):
        self.host, self.port, self.ssl = host, port, ssl
        self.requests: list[tuple[str, Headers]] = []  # (path, headers) of every handshake, for tests
        self.server: Server | None = None
        self.handler = self._handle if shape in ("openai", "azure") else native.SHAPES[shape]
        self.rest = native.REST.get(shape)
        self.issued: set[str] = set()  # signatures of the signed URLs it handed out
        self.first_messages: list[bytes] = []  # of every ElevenLabs text-to-speech session, for tests

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl else "ws"
        return f"{scheme}://{self.host}:{self.port}"

    async def __aenter__(self):
        self.server = server = await serve(
            self._serve,
            self.host,
            self.port,
            ssl=self.ssl,
            compression=None,
            max_size=None,
            process_request=self._record,
            select_subprotocol=lambda _, offered: offered[0] if offered else None,
        )
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        assert self.server is not None  # __aenter__ started it
        self.server.close()
        await self.server.wait_closed()

    def _record(self, connection, request):
        self.requests.append((request.path, request.headers))
        # A provider's REST calls before a session, and its checks on the upgrade.
        return None if self.rest is None else self.rest(self, connection, request)

    async def _serve(self, ws: ServerConnection):
        assert ws.request is not None  # the handshake is done
        url = urllib.parse.urlsplit(ws.request.path)
        query = urllib.parse.parse_qs(url.query)
        if self.handler == self._handle and url.path.endswith("/realtime/translations"):
            await _translation(ws, query.get("model", [""])[0])
        elif self.handler == self._handle and "/live/sessions" in url.path:
            await _live(ws, started=url.path.endswith("/attach"))
        elif (
            self.handler == self._handle
            and query.get("intent") == ["transcription"]
            and not query.get("model")
        ):
            await _transcription(ws)
        elif self.handler == native.elevenlabs and "/text-to-speech/" in url.path:
            await native.text_to_speech(ws, self.first_messages)
        elif self.handler == native.elevenlabs and url.path.endswith("/v1/speech-to-text/realtime"):
            await native.speech_to_text(ws)
        else:
            await self.handler(ws)

    async def _handle(self, ws: ServerConnection):
        session = {
            "id": f"sess_{next(_ids)}",
            "object": "realtime.session",
            "type": "realtime",
            "model": "mock-realtime",
            "output_modalities": ["audio"],
        }
        await ws.send(
            _encoder.encode(
                {"type": "session.created", "event_id": f"event_{next(_ids)}", "session": session}
            ).decode()
        )
        audio_in = 0
        async for message in ws:
            if isinstance(message, bytes):
                await ws.send(message)
                continue
            try:
                event = _decoder.decode(message)
                kind = event.get("type") if isinstance(event, dict) else None
            except msgspec.DecodeError:
                kind = None
            if kind == "session.update":
                await _updated(ws, session, event, "session.updated")
            elif kind == "input_audio_buffer.append":
                audio = event.get("audio", "")
                audio_in += _audio_bytes(audio)
                await ws.send(
                    _event(
                        "response.output_audio.delta",
                        response_id="resp_mock",
                        item_id="item_mock",
                        output_index=0,
                        content_index=0,
                        delta=audio,
                    )
                )
            elif kind == "conversation.item.create" and isinstance(event.get("item"), dict):
                item = {"id": f"item_{next(_ids)}", **event["item"], "status": "completed"}
                for done in ("added", "done"):
                    await ws.send(_event(f"conversation.item.{done}", previous_item_id=None, item=item))
            elif kind in ("input_audio_buffer.commit", "response.create"):
                response = _response(audio_in)
                if kind == "response.create":
                    # LiveKit matches a response to its request by the metadata it set.
                    params = event.get("response")
                    response["metadata"] = params.get("metadata") if isinstance(params, dict) else None
                    await ws.send(
                        _event(
                            "response.created", response={**response, "status": "in_progress", "usage": None}
                        )
                    )
                await ws.send(_event("response.done", response=response))
                audio_in = 0
            else:
                await ws.send(message)


_TRANSCRIBERS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-transcribe-diarize")


async def _transcription(ws: ServerConnection) -> None:
    session: dict = {"id": f"sess_{next(_ids)}", "object": "realtime.session", "type": "transcription"}
    await ws.send(_event("session.created", session=session))
    model, audio_in = "", 0
    async for event in _events(ws):
        kind = event.get("type")
        update = event.get("session") or {}
        if kind in ("session.update", "transcription_session.update"):
            if kind == "session.update":
                named = ((update.get("audio") or {}).get("input") or {}).get("transcription", {}).get("model")
            else:
                named = (update.get("input_audio_transcription") or {}).get("model")
            if named is not None and named not in _TRANSCRIBERS:
                error = {
                    "type": "invalid_request_error",
                    "code": "invalid_value",
                    "event_id": event.get("event_id"),
                }
                await ws.send(_event("error", error={**error, "message": f"Invalid value: {named!r}."}))
                continue
            model = named or model
            await _updated(ws, session, event, kind + "d")
        elif kind == "input_audio_buffer.append":
            audio_in += _audio_bytes(event.get("audio", ""))
        elif kind == "input_audio_buffer.commit":
            item = f"item_{next(_ids)}"
            seconds = audio_in / 48000  # pcm16 at 24 kHz
            text = f"{audio_in} bytes heard by {model or 'no model'}"
            audio_tokens = audio_in // 4800
            usage = (
                {"type": "duration", "seconds": seconds}
                if model == "whisper-1"
                else {
                    "type": "tokens",
                    "input_tokens": audio_tokens,
                    "output_tokens": 5,
                    "total_tokens": audio_tokens + 5,
                    "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                }
            )
            await ws.send(_event("input_audio_buffer.committed", previous_item_id=None, item_id=item))
            fields = dict(item_id=item, content_index=0)
            await ws.send(_event("conversation.item.input_audio_transcription.delta", delta=text, **fields))
            await ws.send(
                _event(
                    "conversation.item.input_audio_transcription.completed",
                    transcript=text,
                    usage=usage,
                    **fields,
                )
            )
            audio_in = 0


async def _translation(ws: ServerConnection, model: str) -> None:
    session: dict = {
        "id": f"sess_{next(_ids)}",
        "type": "translation",
        "model": model,
        "expires_at": 0,
        "audio": {"input": {}, "output": {"language": None}},
    }
    await ws.send(_event("session.created", session=session))
    async for event in _events(ws):
        kind = event.get("type")
        if kind == "session.update":
            session["audio"] = (event.get("session") or {}).get("audio", session["audio"])
            await ws.send(_event("session.updated", session=session))
        elif kind == "session.input_audio_buffer.append":
            await ws.send(_event("session.output_audio.delta", delta=event.get("audio", "")))
        elif kind == "session.close":
            await ws.send(_event("session.closed"))
            await ws.close()


async def _live(ws: ServerConnection, started: bool) -> None:
    session: dict = {"id": f"sess_{next(_ids)}", "expires_at": 0, "model": "gpt-live-1", "status": "active"}
    # A sideband joins a session under way: 5 s so far, reflected to it at once.
    audio_in = 48000 * 5 if started else 0
    if started:
        await ws.send(_event("session.usage.updated", usage={"seconds": audio_in / 48000}))
    async for event in _events(ws):
        kind = event.get("type")
        if kind == "session.start" and not started:
            started = True
            await _updated(ws, session, event, "session.started")
        elif not started:
            error = {"type": "invalid_request_error", "code": "session_not_started", "message": "no session"}
            await ws.send(_event("error", error=error))
        elif kind == "session.update":
            await _updated(ws, session, event, "session.updated")
        elif kind == "session.input_audio.append":
            audio = event.get("audio", "")
            audio_in += _audio_bytes(audio)
            await ws.send(_event("session.output_audio.delta", delta=audio))
            await ws.send(_event("session.usage.updated", usage={"seconds": audio_in / 48000}))
        elif kind == "session.close":
            await ws.send(
                _event(
                    "session.closed",
                    reason="close_requested",
                    session=session,
                    usage={"seconds": audio_in / 48000},
                )
            )
            await ws.close()


async def _events(ws: ServerConnection):
    """The client's JSON events; what is not JSON gets an `error` event, as OpenAI's."""
    async for message in ws:
        try:
            event = _decoder.decode(message)
        except msgspec.DecodeError:
            await ws.send(_event("error", error={"type": "invalid_request_error", "message": "not JSON"}))
            continue
        yield event


async def _updated(ws: ServerConnection, session: dict, event: dict, answer: str) -> None:
    """A client's session settings applied: `answer` with the session as it now is."""
    session.update(event.get("session") or {})
    await ws.send(_event(answer, session=session))


def _audio_bytes(audio: str) -> int:
    """The bytes of a base64 audio append (as the provider would count them)."""
    return len(base64.b64decode(audio, validate=False))


def _event(kind: str, **fields) -> str:
    return _encoder.encode({"type": kind, "event_id": f"event_{next(_ids)}", **fields}).decode()


def _response(audio_bytes: int) -> dict:
    """A `response.done` payload; token counts derived from the audio received
    (pcm16 at 24 kHz is 48,000 bytes/s; OpenAI bills about 10 audio tokens/s)."""
    audio_tokens = audio_bytes // 4800
    return {
        "id": "resp_mock",
        "object": "realtime.response",
        "status": "completed",
        "output": [],
        "usage": {
            "total_tokens": 2 * audio_tokens + 12,
            "input_tokens": audio_tokens + 7,
            "output_tokens": audio_tokens + 5,
            "input_token_details": {"text_tokens": 7, "audio_tokens": audio_tokens, "cached_tokens": 0},
            "output_token_details": {"text_tokens": 5, "audio_tokens": audio_tokens},
        },
    }


async def main(host: str, port: int, shape: str = "openai") -> None:
    async with MockProvider(host, port, shape=shape) as mock:
        print(f"mock provider on {mock.url}", flush=True)
        await asyncio.Event().wait()


SHAPES = ("openai", "azure", *native.SHAPES)
