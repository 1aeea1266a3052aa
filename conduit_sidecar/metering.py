"""Usage metering from relayed provider events, one decoder per provider shape.

The relay hands over only provider messages whose first bytes contain one of the
provider's markers, whole even when fragmented (or, for a provider whose usage may
come after kilobytes of audio, messages with a marker anywhere, from that marker on);
they are decoded here with msgspec.
A message with a marker that is not a usage event is ignored (but for OpenAI's session
events, which name the model its transcription usage is billed at); a usage event that is
malformed (wrong types, negative or absurd numbers) raises `MalformedUsage`, which the
caller counts and ignores: metering never breaks a session.

Counts are `{kind: number}`: token kinds (`TOKEN_KINDS`) and seconds kinds
(`SECONDS_KINDS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import msgspec

from .held import provider_transcription

__all__ = [
    "METERS",
    "MODEL_LABELS_MAX",
    "MalformedUsage",
    "Meter",
    "SECONDS_KINDS",
    "TOKEN_KINDS",
    "Transcription",
    "Usage",
]

# Token kinds: `input`/`output` are totals; the others break them down. Cached input
# tokens are also in `input_text`, `input_audio` or `input_image` (OpenAI's counts);
# `input_cached_audio` and `input_cached_image` are the audio and image parts of
# `input_cached`, which prices need: cached audio and images are billed far below
# audio and images, not taken off the text.
TOKEN_KINDS = (
    "input",
    "output",
    "input_text",
    "input_audio",
    "input_image",
    "input_cached",
    "input_cached_audio",
    "input_cached_image",
    "output_text",
    "output_audio",
)
SECONDS_KINDS = ("audio",)
MODEL_LABELS_MAX = 100

# One event never reports more than this; larger numbers are a provider bug or an attack.
Tokens = Annotated[int, msgspec.Meta(ge=0, le=100_000_000)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=7 * 86400)]


class MalformedUsage(ValueError):
    """A usage event whose usage cannot be trusted."""


class Meter(msgspec.Struct, frozen=True):
    """What the relay sniffs for (markers within the first `sniff_bytes` of a provider
    message; binary messages too when `binary`) and how the message is decoded. With
    `sniff_bytes` 0 the whole message is searched, and `decode` gets it from its first
    marker on."""

    markers: tuple[bytes, ...]
    decode: Callable[[bytes], dict[str, float] | None]
    binary: bool = False
    sniff_bytes: int = 256
    # Each report is the session's total so far (OpenAI Live's), not a new part of it:
    # Usage.add counts its rise over what the session has counted.
    cumulative: bool = False
    # The transcription model a marked message that reports no usage names (OpenAI's
    # session events), at which the session's Transcription reports are billed.
    transcriber: Callable[[bytes], str | None] | None = None
    # The provider bills a session's time open (AssemblyAI), idle time included, but
    # reports it only at a graceful end: a session that ends without a report is charged
    # its time open (governance).
    open_time: bool = False


_NONE = msgspec.Raw()  # a field that is absent


class _Envelope(msgspec.Struct):
    """Just enough to tell a usage event from another message naming its marker."""

    type: str = ""
    response: msgspec.Raw = _NONE
    usage: msgspec.Raw = _NONE


_envelope = msgspec.json.Decoder(_Envelope)


def _given(raw: msgspec.Raw) -> bool:
    return len(raw) > 0 and bytes(raw) != b"null"


def _strict(raw: msgspec.Raw, decoder: msgspec.json.Decoder):
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise MalformedUsage(str(exc)) from None


# -- OpenAI realtime: response.done and transcription usage ------------------------


class _CachedDetails(msgspec.Struct):
    text_tokens: Tokens = 0
    audio_tokens: Tokens = 0
    image_tokens: Tokens = 0


class _InputDetails(msgspec.Struct):
    text_tokens: Tokens = 0
    audio_tokens: Tokens = 0
    image_tokens: Tokens = 0
    cached_tokens: Tokens = 0
    cached_tokens_details: _CachedDetails | None = None  # a breakdown of cached_tokens


class _OutputDetails(msgspec.Struct):
    text_tokens: Tokens = 0
    audio_tokens: Tokens = 0


class _Usage(msgspec.Struct):
    type: str = "tokens"  # transcription: "tokens" or "duration"
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    seconds: Seconds = 0.0
    input_token_details: _InputDetails | None = None
    output_token_details: _OutputDetails | None = None


class _Response(msgspec.Struct):
    usage: msgspec.Raw = _NONE


_response = msgspec.json.Decoder(_Response)
_usage = msgspec.json.Decoder(_Usage)


def _tokens(u: _Usage) -> dict[str, float]:
    i = u.input_token_details or _InputDetails()
    o = u.output_token_details or _OutputDetails()
    cached = i.cached_tokens_details or _CachedDetails()
    # Transcription usage has no output_token_details: its output is the transcript.
    return _untold_as_text(
        {
            "input": u.input_tokens,
            "output": u.output_tokens,
            "input_text": i.text_tokens,
            "input_audio": i.audio_tokens,
            "input_image": i.image_tokens,
            "input_cached": i.cached_tokens,
            "input_cached_audio": cached.audio_tokens,
            "input_cached_image": cached.image_tokens,
            "output_text": o.text_tokens,
            "output_audio": o.audio_tokens,
        }
    )


def _untold_as_text(counts: dict[str, float]) -> dict[str, float]:
    """Tokens no detail names a modality for (a total sent without its breakdown) are
    priced as text, not left out."""
    for side in ("input", "output"):
        told = sum(counts[f"{side}_{m}"] for m in ("text", "audio", "image") if f"{side}_{m}" in counts)
        counts[f"{side}_text"] += max(0, counts[side] - told)
    return counts


class Transcription(dict[str, float]):
    """The counts of an OpenAI transcription report: "billed according to the ASR
    model's pricing rather than the realtime model's pricing" (openai-python's
    ConversationItemInputAudioTranscriptionCompletedEvent.usage), so at the session's
    transcription model (Usage.transcriber) where its session events named one."""


def decode_openai(message: bytes) -> dict[str, float] | None:
    try:
        event = _envelope.decode(message)
    except msgspec.DecodeError:
        return None  # not JSON we know: the marker was inside some other text
    if event.type == "response.done" and _given(event.response):
        raw = _strict(event.response, _response).usage
        return _tokens(_strict(raw, _usage)) if _given(raw) else None
    if event.type == "conversation.item.input_audio_transcription.completed" and _given(event.usage):
        u = _strict(event.usage, _usage)
        if u.type == "duration":
            return Transcription(audio=u.seconds)
        if u.type == "tokens":
            return Transcription(_tokens(u))
        raise MalformedUsage(f"unknown usage type {u.type!r}")
    return None


# -- OpenAI Live: the session's audio seconds so far -------------------------------


class _LiveUsage(msgspec.Struct):
    seconds: Seconds


_live_usage = msgspec.json.Decoder(_LiveUsage)


def decode_openai_live(message: bytes) -> dict[str, float] | None:
    """`session.usage.updated` and `session.closed` report the session's billable
    seconds so far (SessionUsage: "do not sum values across usage events"), hence
    Meter.cumulative."""
    try:
        event = _envelope.decode(message)
    except msgspec.DecodeError:
        return None
    if event.type in ("session.usage.updated", "session.closed") and _given(event.usage):
        return {"audio": _strict(event.usage, _live_usage).seconds}
    return None


# -- Gemini Live: usageMetadata ------------------------------------------------------


class _Modality(msgspec.Struct):
    modality: str = ""
    tokenCount: Tokens = 0


class _UsageMetadata(msgspec.Struct):
    """Gemini's total is prompt + response + tool-use prompt + thoughts: all billed,
    the last two at the input and output text prices. Vertex AI names the response
    `candidates` (its UsageMetadata's), AI Studio `response`."""

    promptTokenCount: Tokens = 0
    responseTokenCount: Tokens = 0
    candidatesTokenCount: Tokens = 0
    cachedContentTokenCount: Tokens = 0
    toolUsePromptTokenCount: Tokens = 0
    thoughtsTokenCount: Tokens = 0
    promptTokensDetails: list[_Modality] = []
    responseTokensDetails: list[_Modality] = []
    candidatesTokensDetails: list[_Modality] = []
    toolUsePromptTokensDetails: list[_Modality] = []
    cacheTokensDetails: list[_Modality] = []


class _GeminiMessage(msgspec.Struct):
    usageMetadata: msgspec.Raw = _NONE


_gemini = msgspec.json.Decoder(_GeminiMessage)
_gemini_usage = msgspec.json.Decoder(_UsageMetadata)
_MODALITY = {"TEXT": "text", "AUDIO": "audio", "IMAGE": "image", "VIDEO": "image"}


_GEMINI_MARKER = b'"usageMetadata"'
# Markers tried per message: each try may parse the whole rest of it (4 MiB), so a
# message with a marker at every turn must not get a try per marker.
_GEMINI_TRIES = 4


def decode_gemini(message: bytes) -> dict[str, float] | None:
    """`message` is a server message, or its part from its first marker on (the relay's,
    Meter.sniff_bytes 0). The top-level usageMetadata is the marker from which the rest,
    opened as an object, parses: one nested in the content (a text part, a tool call's
    arguments) leaves closing brackets over. A server message holds one content field
    besides its usage, so the usage is the last marker (proto JSON orders fields by
    number, usageMetadata after the content) or the first: those are tried, then a few
    before the last (_GEMINI_TRIES in all; more left untried make the message
    malformed); each try reads the same buffer, no copy."""
    buf = bytearray(b" " + message)
    first = buf.find(_GEMINI_MARKER)
    if first < 0:
        return None
    tries: list[int] = []
    at = len(buf)
    while (at := buf.rfind(_GEMINI_MARKER, first + 1, at)) > first and len(tries) < _GEMINI_TRIES - 1:
        tries.append(at)
    untried = at > first
    tries.insert(1, first)
    for at in tries:
        before, buf[at - 1] = buf[at - 1], ord("{")
        try:
            raw = _gemini.decode(memoryview(buf)[at - 1 :]).usageMetadata
            break
        except msgspec.DecodeError:
            buf[at - 1] = before
    else:
        if untried:
            raise MalformedUsage(f"more usageMetadata markers than the {_GEMINI_TRIES} tried")
        return None
    if not _given(raw):
        return None
    u = _strict(raw, _gemini_usage)
    counts: dict[str, float] = dict.fromkeys(TOKEN_KINDS, 0)
    counts.update(
        input=u.promptTokenCount + u.toolUsePromptTokenCount,
        output=(u.responseTokenCount or u.candidatesTokenCount) + u.thoughtsTokenCount,
        input_cached=u.cachedContentTokenCount,
        output_text=u.thoughtsTokenCount,
    )
    for side, details in (
        ("input", u.promptTokensDetails),
        ("input", u.toolUsePromptTokensDetails),
        ("output", u.responseTokensDetails or u.candidatesTokensDetails),
        ("input_cached", u.cacheTokensDetails),
    ):
        for d in details:
            kind = f"{side}_{_MODALITY.get(d.modality, '')}"
            if kind in counts and kind != "output_image":
                counts[kind] += d.tokenCount
    return _untold_as_text(counts)


# -- Deepgram and AssemblyAI: audio seconds at the end of a stream -------------------


class _DeepgramMetadata(msgspec.Struct):
    """A listen stream's last message, with the seconds of audio it took. Speak's
    `Metadata` (a TTS stream's first message) has no duration and reports no usage:
    Speak bills characters, which no message reports."""

    type: str
    duration: Seconds | None = None
    channels: Annotated[int, msgspec.Meta(ge=1, le=32)] = 1

    @property
    def each_channel(self) -> float | None:
        """A `multichannel=true` stream's billed seconds: Deepgram bills each channel,
        and `duration` is the stream's length (a container's bytes tell no channels)."""
        return None if self.duration is None else self.duration * self.channels


class _AssemblyTermination(msgspec.Struct):
    """AssemblyAI bills a streaming session by how long it was open, idle time
    included: its session's seconds, where it reports them, not its audio's."""

    type: str
    audio_duration_seconds: Seconds = 0.0
    session_duration_seconds: Seconds | None = None

    @property
    def billed(self) -> float:
        return (
            self.audio_duration_seconds
            if self.session_duration_seconds is None
            else self.session_duration_seconds
        )


def _seconds_decoder(kind: str, shape: type, field: str):
    decoder: msgspec.json.Decoder[msgspec.Struct] = msgspec.json.Decoder(shape)

    def decode(message: bytes) -> dict[str, float] | None:
        try:
            if _envelope.decode(message).type != kind:
                return None
        except msgspec.DecodeError:
            return None
        try:
            seconds = getattr(decoder.decode(message), field)
        except msgspec.DecodeError as exc:
            raise MalformedUsage(str(exc)) from None
        return None if seconds is None else {"audio": seconds}

    return decode


METERS: dict[str, Meter] = {
    "openai": Meter(
        (
            b'"response.done"',
            b'"conversation.item.input_audio_transcription.completed"',
            b'"session.created"',
            b'"session.updated"',
            b'"transcription_session.created"',
            b'"transcription_session.updated"',
        ),
        decode_openai,
        transcriber=provider_transcription,
    ),
    # Gemini sends JSON in binary frames, usageMetadata after the serverContent it closes:
    # Gemini 3.x Live bundles a turn's last audio, turnComplete and usageMetadata in one
    # message, so the marker may come after any number of kilobytes.
    "gemini": Meter((_GEMINI_MARKER,), decode_gemini, binary=True, sniff_bytes=0),
    "deepgram": Meter((b'"Metadata"',), _seconds_decoder("Metadata", _DeepgramMetadata, "duration")),
    "deepgram_multichannel": Meter(
        (b'"Metadata"',), _seconds_decoder("Metadata", _DeepgramMetadata, "each_channel")
    ),
    "assemblyai": Meter(
        (b'"Termination"',), _seconds_decoder("Termination", _AssemblyTermination, "billed"), open_time=True
    ),
}
METERS["azure"] = METERS["openai"]  # Azure OpenAI speaks OpenAI's events
# OpenAI's Live sessions (providers.Kept.meter). Their delegated Responses backends'
# tokens come in nested `response.event`s, not read.
METERS["openai_live"] = Meter(
    (b'"session.usage.updated"', b'"session.closed"'), decode_openai_live, cumulative=True
)


class Usage:
    """A session's running totals."""

    __slots__ = ("tokens", "seconds", "topped_up", "transcriber")

    def __init__(self):
        self.tokens: dict[str, float] = dict.fromkeys(TOKEN_KINDS, 0)
        self.seconds = dict.fromkeys(SECONDS_KINDS, 0.0)
        self.topped_up = 0.0  # audio seconds charged beyond the binary frames' (governance)
        self.transcriber: str | None = None  # the model its Transcription reports are billed at

    def add(self, counts: dict[str, float], cumulative: bool = False) -> dict[str, float]:
        """Adds one report and returns what it added: with `cumulative` (the report is
        the session's total so far, Meter.cumulative) its rise over the totals, never
        below zero, so nothing is counted twice."""
        if cumulative:
            counts = {
                kind: max(0.0, n - (self.seconds[kind] if kind in self.seconds else self.tokens[kind]))
                for kind, n in counts.items()
            }
        for kind, n in counts.items():
            if kind in self.seconds:
                self.seconds[kind] += n
            else:
                self.tokens[kind] += n
        return counts
