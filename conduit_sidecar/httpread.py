"""Reading one HTTP/1.1 request head from a peer, bounded in size: the client's
upgrade request and the admin port's requests alike.

Parsing is websockets' sans-I/O parser; this module only feeds it and turns its
errors into an HTTP status with a text that never repeats the offending line (it may
be an `Authorization` header).
"""

from __future__ import annotations

import re

from websockets.exceptions import SecurityError
from websockets.http11 import Request
from websockets.streams import StreamReader

__all__ = ["BadRequest", "RequestReader", "what"]

_QUOTES = re.compile("[:;]")  # what follows either in websockets' errors may be the peer's


class BadRequest(Exception):
    """The request cannot be served: answer `status` with the message."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


class RequestReader:
    """`feed(data)` until it returns the request; `early` is then what the peer sent
    past the head. Raises BadRequest; never holds more than `max_bytes` plus one read.

    The head's lines go to the parser only once its end (a blank line) has come, or
    past `max_bytes`, the first line at once: the parser refuses a bad request line as
    soon as it is read, but a header it has parsed is a handful of Python objects, and a
    peer without a key that sends 127 of them and never ends its head would hold some
    40 KiB of them per connection where the bytes are 16."""

    __slots__ = ("max_bytes", "size", "reader", "parser", "held", "given", "early")

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        self.reader = StreamReader()
        self.parser = Request.parse(self.reader.read_line)
        next(self.parser)
        self.held = bytearray()  # what the peer sent, while its head is unfinished
        # how much of `held` the parser has had (its request line)
        self.given = 0
        self.early = b""

    def feed(self, data: bytes) -> Request | None:
        self.size += len(data)
        held = self.held
        seen: bytes | bytearray = data  # what came so far: `data`, or `held` with it
        start = len(held)
        if start:  # the head comes in parts: its end may begin in the two bytes before `data`
            held += data
            seen = held
            start = start - 2 if start > 1 else 0
        try:
            if (
                seen.find(b"\n\r\n", start) >= 0
                or seen.find(b"\n\n", start) >= 0
                or self.size > self.max_bytes
            ):
                self._give(seen[self.given :] if self.given else seen)
            else:
                if seen is not held:
                    held += data
                # Only the new bytes: none before them ended the request line.
                if not self.given and (line := held.find(b"\n", len(held) - len(data)) + 1):
                    self.given = line
                    self._give(held[:line])
        except StopIteration as done:
            self.early = bytes(self.reader.buffer)
            if self.size - len(self.early) > self.max_bytes:
                raise BadRequest(431, "request headers too large") from None
            return done.value
        except SecurityError as exc:
            raise BadRequest(431, f"request too large: {what(exc)}") from None
        except (ValueError, NotImplementedError, UnicodeDecodeError, EOFError) as exc:
            # EOFError: a line without CRLF (websockets' parser says "connection closed")
            raise BadRequest(400, f"bad request: {what(exc)}") from None
        if self.size > self.max_bytes:
            raise BadRequest(431, "request headers too large")
        return None

    def _give(self, data: bytes | bytearray) -> None:
        self.reader.feed_data(data)
        next(self.parser)


def what(exc: Exception) -> str:
    """A websockets parser or handshake error without the text it quotes ("invalid
    HTTP header line: Authorization: ...", "unsupported protocol; expected HTTP/1.1:
    GET /?key=...", "invalid status code; expected integer; got /?key=..."): a peer's
    line may hold a secret, even ours echoed back."""
    if isinstance(exc, NotImplementedError):  # "transfer coding {the peer's value} isn't supported"
        return "unsupported transfer coding"
    return _QUOTES.split(str(exc), 1)[0]
