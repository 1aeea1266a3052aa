"""The client's first message, held before the upstream is opened: Gemini names its
model in its first `setup` message, not in the URL, so model policy is checked there.

The message is parsed with websockets' sans-I/O protocol only to find where it ends
and what it says; the relay is then handed the raw bytes exactly as received (still
masked), so the provider gets the client's frames unchanged. Bounded in size (the
session's max_message_bytes) and time (the handshake timeout).
"""

from __future__ import annotations

import asyncio

import msgspec
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from ._relay import CloseCode

__all__ = ["Refused", "read_first", "setup_model"]

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


def setup_model(message: bytes) -> str:
    """The model a Gemini `setup` message names, without its `models/` prefix."""
    try:
        model = _setup.decode(message).setup.model
    except msgspec.DecodeError:
        raise Refused(
            CloseCode.PROTOCOL_ERROR, "the first message must be a setup message naming the model"
        ) from None
    model = model.removeprefix("models/")
    if not model or any(c < " " or c == "\x7f" for c in model):
        raise Refused(CloseCode.PROTOCOL_ERROR, "setup names no valid model")
    return model
