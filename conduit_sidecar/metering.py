"""Usage metering from relayed provider events.

The relay hands over only text messages whose first bytes contain the marker
(`"response.done"`), whole even when fragmented; they are decoded here with
msgspec. Binary frames are never looked at: audio duration comes from the relay's
C payload counters.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["MARKER", "MODEL_LABELS_MAX", "TOKEN_KINDS", "MalformedUsage", "Usage", "decode_usage"]

MARKER = b'"response.done"'
# Token kinds: `input`/`output` are totals; the others break them down.
TOKEN_KINDS = ("input", "output", "input_text", "input_audio", "input_cached",
               "output_text", "output_audio")
MODEL_LABELS_MAX = 100
# A count no single response reports: negative or absurd usage is the provider's bug
# (or an impostor's), never a reason to count, or to fail the session.
Tokens = Annotated[int, msgspec.Meta(ge=0, le=100_000_000)]


class MalformedUsage(ValueError):
    """A usage event whose counts are not plausible token counts."""


class _InputDetails(msgspec.Struct):
    text_tokens: Tokens = 0
    audio_tokens: Tokens = 0
    cached_tokens: Tokens = 0


class _OutputDetails(msgspec.Struct):
    text_tokens: Tokens = 0
    audio_tokens: Tokens = 0


class _Usage(msgspec.Struct):
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    input_token_details: _InputDetails | None = None
    output_token_details: _OutputDetails | None = None


class _Response(msgspec.Struct):
    usage: _Usage | None = None


class _ResponseDone(msgspec.Struct):
    type: str
    response: _Response | None = None


_decoder = msgspec.json.Decoder(_ResponseDone)


def decode_usage(message: bytes) -> dict[str, int] | None:
    """Token counts of an OpenAI `response.done` event, or None if it is not one;
    MalformedUsage if its counts are not plausible."""
    try:
        event = _decoder.decode(message)
    except msgspec.ValidationError as exc:
        raise MalformedUsage(str(exc)) from None
    except msgspec.DecodeError:
        return None
    if event.type != "response.done" or event.response is None or event.response.usage is None:
        return None
    u = event.response.usage
    i = u.input_token_details or _InputDetails()
    o = u.output_token_details or _OutputDetails()
    return {"input": u.input_tokens, "output": u.output_tokens,
            "input_text": i.text_tokens, "input_audio": i.audio_tokens,
            "input_cached": i.cached_tokens,
            "output_text": o.text_tokens, "output_audio": o.audio_tokens}


class Usage:
    """A session's running token totals."""

    __slots__ = ("tokens",)

    def __init__(self):
        self.tokens = dict.fromkeys(TOKEN_KINDS, 0)

    def add(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            self.tokens[kind] += n
