"""The client's first message, held before the upstream is opened: Gemini names its
model in its first `setup` message, and an OpenAI transcription session
(`intent=transcription`) in its first session update, not in the URL, so model policy
is checked there.

The message is parsed with websockets' sans-I/O protocol only to find where it ends
and what it says; the relay is then handed the raw bytes exactly as received (still
masked), so the provider gets the client's frames unchanged. Bounded in size (the
limits' first_message_bytes) and time (the handshake timeout).
"""

from __future__ import annotations

import asyncio

import msgspec
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from ._relay import CloseCode

__all__ = ["MAX_MODEL_CHARS", "Refused", "read_first", "setup_model", "transcription_model"]

_DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)
_SLACK = 65536  # control frames around the first message


class Refused(Exception):
    """The first message cannot be accepted: close with `code` and the message."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


class _FirstMessage(asyncio.Protocol):
    def __init__(self, transport, limit: int):
        self.transport = transport
        self.limit = limit
        self.ws = ServerProtocol(state=OPEN, max_size=limit)
        self.raw = bytearray()
        self.parts: list[bytes | bytearray | memoryview] = []
        self.done = asyncio.get_running_loop().create_future()

    def _finish(self, value) -> None:
        if not self.done.done():
            self.transport.pause_reading()
            (self.done.set_exception if isinstance(value, Exception) else self.done.set_result)(value)

    def data_received(self, data) -> None:
        if self.done.done():
            self.raw += data  # arrived in the same read: the relay gets it
            return
        self.raw += data
        self.ws.receive_data(bytes(data))
        for frame in self.ws.events_received():
            assert isinstance(frame, Frame)  # OPEN: no handshake events any more
            if frame.opcode in _DATA:
                self.parts.append(frame.data)
                if frame.fin:
                    self._finish(b"".join(self.parts))
                    return
            elif frame.opcode == Opcode.CLOSE:
                self._finish(Refused(CloseCode.NORMAL, "closed before its first message"))
                return
        if self.ws.close_sent is not None:  # websockets judged a violation
            self._finish(Refused(self.ws.close_sent.code, self.ws.close_sent.reason))
        elif len(self.raw) > self.limit + _SLACK:
            self._finish(Refused(CloseCode.MESSAGE_TOO_BIG, f"first message over {self.limit} bytes"))

    def eof_received(self):
        self._finish(Refused(CloseCode.NORMAL, "closed before its first message"))
        return False

    def connection_lost(self, exc) -> None:
        self._finish(Refused(CloseCode.NORMAL, "closed before its first message"))


async def read_first(transport, early: bytes, limit: int, timeout: float) -> tuple[bytes, bytes]:
    """(the first data message, every raw byte read so far). The transport's reading
    is paused when this returns."""
    reader = _FirstMessage(transport, limit)
    transport.set_protocol(reader)
    if early:
        reader.data_received(early)
    if not reader.done.done():
        transport.resume_reading()
    try:
        async with asyncio.timeout(timeout):
            message = await reader.done
    except TimeoutError:
        transport.pause_reading()
        raise Refused(CloseCode.PROTOCOL_ERROR, f"no first message within {timeout:g} s") from None
    return message, bytes(reader.raw)


class _SetupBody(msgspec.Struct):
    model: str


class _Setup(msgspec.Struct):
    setup: _SetupBody


_setup = msgspec.json.Decoder(_Setup)


# Model names are short identifiers; a first message may be a megabyte long,
# and the model goes into log lines and metric labels.
MAX_MODEL_CHARS = 256


def _valid(model: str) -> bool:
    return 0 < len(model) <= MAX_MODEL_CHARS and not any(c < " " or c == "\x7f" for c in model)


def setup_model(message: bytes) -> str:
    """The model a Gemini `setup` message names, without its `models/` prefix."""
    try:
        model = _setup.decode(message).setup.model
    except msgspec.DecodeError:
        raise Refused(
            CloseCode.PROTOCOL_ERROR, "the first message must be a setup message naming the model"
        ) from None
    model = model.removeprefix("models/")
    if not _valid(model):
        raise Refused(CloseCode.PROTOCOL_ERROR, "setup names no valid model")
    return model


class _Transcription(msgspec.Struct):
    model: str | None = None


class _AudioInput(msgspec.Struct):
    transcription: _Transcription | None = None


class _Audio(msgspec.Struct):
    input: _AudioInput | None = None


class _Session(msgspec.Struct):
    type: str | None = None
    audio: _Audio | None = None  # GA
    input_audio_transcription: _Transcription | None = None  # beta


class _ClientEvent(msgspec.Struct):
    type: str
    session: _Session | None = None


_client_event = msgspec.json.Decoder(_ClientEvent)


def transcription_model(message: bytes) -> str | None:
    """The transcription model an OpenAI transcription session's first message names:
    GA `session.update` with `session.type` "transcription" and
    `session.audio.input.transcription.model`, or beta `transcription_session.update`
    with `session.input_audio_transcription.model`. None: it names none (another
    event, or an update without a model)."""
    try:
        event = _client_event.decode(message)
    except msgspec.DecodeError:
        raise Refused(CloseCode.PROTOCOL_ERROR, "the first message must be a JSON client event") from None
    session = event.session or _Session()
    named: _Transcription | None = None
    if event.type == "session.update" and session.type == "transcription":
        named = session.audio.input.transcription if session.audio and session.audio.input else None
    elif event.type == "transcription_session.update":
        named = session.input_audio_transcription
    model = named.model if named else None
    if model is not None and not _valid(model):
        raise Refused(CloseCode.PROTOCOL_ERROR, "the session update names no valid transcription model")
    return model
