"""The client's first message, held before it goes upstream: Gemini names its model in
its first `setup` message, an OpenAI transcription session (`intent=transcription`) in
its first session update, an OpenAI Live session in its `session.start`, and
Deepgram's agent its models in its `Settings`, not in the URL, so model policy is
checked there. Those are held before the upstream opens; the agent's after, once the
provider's first message (its Welcome, which clients may wait for) has been read here
and passed on.

The message is parsed with websockets' sans-I/O protocol only to find where it ends
and what it says, its frames judged by the relay's scanner; the relay is then handed
the raw bytes exactly as received (still masked), so the provider gets the client's
frames unchanged. Bounded in size (the
limits' first_message_bytes) and time (the handshake timeout).

Later messages of some of those sessions can name models too (the next session update,
Live's delegated backend, the agent's `Update*`) or carry a key: the relay reads each
of their text messages whole and withholds it until `later_*` here have read it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re

import msgspec
import msgspec.inspect
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from ._relay import KIND_NAMES, CloseCode, Scanner
from .keys import KEY_PREFIX
from .redact import redact

__all__ = [
    "MAX_MODEL_CHARS",
    "Refused",
    "agent_settings",
    "keyless",
    "later_agent",
    "later_live",
    "later_transcription",
    "live_models",
    "may_name",
    "Reader",
    "read_first",
    "read_greeting",
    "setup_model",
    "transcription_model",
]

_DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)
_CLOSE = KIND_NAMES.index("close")
_LENGTH_BYTES = {126: 2, 127: 8}  # an unmasked header's second byte: the length's longer forms
_SLACK = 65536  # control frames around the first message


class Refused(Exception):
    """The first message cannot be accepted: close with `code` and the message."""

    def __init__(
        self,
        code: int,
        reason: str,
        gone: bool = False,
        close: tuple[int, str] | None = None,
        fault: bool = False,
        ended: bool = False,
    ):
        super().__init__(reason)
        self.code = code
        self.gone = gone  # the connection is lost: there is no one to tell
        self.ended = ended  # the client sent its close: no other to wait for
        self.close = close  # the provider's own close code and reason, the client's to read
        # The provider failed before its first message (its connection lost, its protocol
        # broken, nothing in time): its deployment's failure (a close is judged by its code).
        self.fault = fault


class Reader(asyncio.Protocol):
    """Reads a leg up to `limit` bytes of one message, into `raw`, and settles `done`
    with a value or a Refused; reading is paused once it is settled."""

    def __init__(self, transport, limit: int):
        self.transport = transport
        self.limit = limit
        self.raw = bytearray()
        self.done = asyncio.get_running_loop().create_future()

    def _finish(self, value) -> None:
        if not self.done.done():
            self.transport.pause_reading()
            (self.done.set_exception if isinstance(value, Exception) else self.done.set_result)(value)

    def going_away(self) -> None:
        """The drain has ended: the session is told so now, not at its timeout."""
        self._finish(Refused(CloseCode.GOING_AWAY, "going away"))


class _FirstMessage(Reader):
    """websockets' parser unmasks and joins the message; the relay's scanner judges
    the frames, as the relay judges every later one (the same codes and reasons;
    websockets' own differ, and it fails a close between fragments, which RFC 6455 5.4
    allows)."""

    def __init__(self, transport, limit: int):
        super().__init__(transport, limit)
        self.ws = ServerProtocol(state=OPEN, max_size=limit)
        self.scanner = Scanner(True, limit, record=False)
        self.parts: list[bytes | bytearray | memoryview] = []

    def data_received(self, data) -> None:
        if self.done.done():
            self.raw += data  # arrived in the same read: the relay gets it
            return
        self.raw += data
        self.scanner.feed_bytes(data)
        self.ws.receive_data(bytes(data))
        # Its answers (a pong per ping) are never sent: the pings go to the provider
        # with the raw bytes, and it answers them. Kept, they outgrew the bytes read.
        self.ws.data_to_send()
        for frame in self.ws.events_received():
            assert isinstance(frame, Frame)  # OPEN: no handshake events any more
            if frame.opcode in _DATA:
                self.parts.append(frame.data)
                if frame.fin:
                    self._finish(b"".join(self.parts))
                    return
        scanner = self.scanner
        if scanner.verdict_code:
            self._finish(Refused(scanner.verdict_code, f"client: {scanner.verdict_reason}"))
        elif scanner.counters()[0][_CLOSE]:
            self._finish(Refused(CloseCode.NORMAL, "closed before its first message", ended=True))
        elif len(self.raw) > self.limit + _SLACK:
            self._finish(Refused(CloseCode.MESSAGE_TOO_BIG, f"first message over {self.limit} bytes"))

    def eof_received(self):
        self._finish(Refused(CloseCode.NORMAL, "closed before its first message"))
        return False

    def connection_lost(self, exc) -> None:
        # Unlike ClientHandshake's, this end does not cancel the opening: it is told.
        self._finish(Refused(CloseCode.NORMAL, "closed before its first message", gone=True))


async def read_first(
    transport, early: bytes, limit: int, timeout: float, holding: set[Reader]
) -> tuple[bytes, bytes]:
    """(the first data message, every raw byte read so far). The transport's reading
    is paused when this returns."""
    reader = _FirstMessage(transport, limit)
    late = Refused(CloseCode.PROTOCOL_ERROR, f"no first message within {timeout:g} s")
    message = await _read(transport, reader, early, timeout, late, holding)
    return message, bytes(reader.raw)


async def _read(transport, reader, early: bytes, timeout: float, late: Refused, holding: set[Reader]):
    """Run `reader` (a protocol whose `done` future it settles) on `transport`, `early`
    first, for at most `timeout`; `late` is raised after it. It is in `holding` while
    it waits (the drain's end tells each reader there it is `going_away`). Reading is
    paused when this returns."""
    transport.set_protocol(reader)
    if early:
        reader.data_received(early)
    if not reader.done.done():
        transport.resume_reading()
    holding.add(reader)
    try:
        async with asyncio.timeout(timeout):
            return await reader.done
    except TimeoutError:
        transport.pause_reading()
        raise late from None
    finally:
        holding.discard(reader)


class _Greeting(Reader):
    """The provider's frames up to the end of its first data message; what follows
    stays for the relay. The relay's scanner delimits and checks them, as it does every
    frame it relays (they reach the client before the relay starts)."""

    def __init__(self, transport, limit: int):
        super().__init__(transport, limit)
        self.scanner = Scanner(False, limit)
        self.seen = 0  # frame ends judged so far

    def data_received(self, data) -> None:
        if self.done.done():
            return
        self.raw += data
        scanner = self.scanner
        scanner.feed_bytes(data)
        if scanner.verdict_code:
            broken = scanner.verdict_code != CloseCode.MESSAGE_TOO_BIG  # (too big: our limit)
            why = f"the provider's first message: {scanner.verdict_reason}"
            self._finish(Refused(CloseCode.UPSTREAM_FAILED, why, fault=broken))
            return
        ends = scanner.frame_boundaries
        for end in ends[self.seen :]:
            start = ends[self.seen - 1] if self.seen else 0
            head = self.raw[start]
            self.seen += 1
            opcode = head & 0x0F
            if opcode == Opcode.CLOSE.value:
                # The client has its 101: the provider's code and reason reach it as from
                # the relay. The scanner judged the frame: unmasked, at most 125 bytes, a
                # valid code, a UTF-8 reason; its length in any form (a 2-, 4- or 10-byte
                # header, RFC 6455 5.2). Without a code: 1014. A secret it quotes: `***`.
                payload = bytes(self.raw[start + 2 + _LENGTH_BYTES.get(self.raw[start + 1], 0) : end])
                close = None
                if payload:
                    close = (int.from_bytes(payload[:2], "big"), redact(payload[2:].decode()))
                why = "the provider closed before its first message"
                self._finish(
                    Refused(CloseCode.UPSTREAM_FAILED, f"{why} ({close[0]})" if close else why, close=close)
                )
                return
            if head & 0x80 and opcode < Opcode.CLOSE.value:  # the message's last frame
                self._finish(end)
                return
        if len(self.raw) > self.limit + _SLACK:  # control frames without end
            self._finish(
                Refused(CloseCode.UPSTREAM_FAILED, f"the provider's first message over {self.limit} bytes")
            )

    def eof_received(self):
        self._finish(
            Refused(CloseCode.UPSTREAM_FAILED, "the provider closed before its first message", fault=True)
        )
        return False

    def connection_lost(self, exc) -> None:
        self._finish(
            Refused(CloseCode.UPSTREAM_FAILED, "the provider closed before its first message", fault=True)
        )


async def read_greeting(
    upstream, early: bytes, limit: int, timeout: float, holding: set[Reader]
) -> tuple[bytes, bytes]:
    """(the provider's frames up to the end of its first data message, the bytes after
    them). The upstream's reading is paused when this returns."""
    reader = _Greeting(upstream, limit)
    late = Refused(
        CloseCode.UPSTREAM_FAILED, f"no first message from the provider within {timeout:g} s", fault=True
    )
    end = await _read(upstream, reader, early, timeout, late, holding)
    return bytes(reader.raw[:end]), bytes(reader.raw[end:])


class _SetupBody(msgspec.Struct):
    model: str


class _Setup(msgspec.Struct):
    setup: _SetupBody


_setup = msgspec.json.Decoder(_Setup)


class _Twice(Exception):
    pass


def _once(pairs: list[tuple[str, object]]) -> dict[str, object]:
    members = dict(pairs)
    if len(members) < len(pairs):
        raise _Twice
    return members


def _fold(name: str) -> str:
    # As Go's encoding/json matches names: in any case, and ſ as s, K (Kelvin) as k.
    return name.upper().lower()


def _walk(value: object, shape: msgspec.inspect.Type, which: str) -> None:
    """Refuse a name in `value` that is one of `shape`'s fields in another case."""
    if isinstance(shape, msgspec.inspect.UnionType):
        for each in shape.types:
            _walk(value, each, which)
    elif isinstance(shape, msgspec.inspect.ListType) and isinstance(value, list):
        for item in value:
            _walk(item, shape.item_type, which)
    elif isinstance(shape, msgspec.inspect.StructType) and isinstance(value, dict):
        fields = {_fold(f.encode_name): f for f in shape.fields}
        for name, member in value.items():
            field = fields.get(_fold(name))
            if field is None:
                continue
            if field.encode_name != name:
                spelled = f"{which} spells {field.encode_name!r} in another case"
                raise Refused(CloseCode.PROTOCOL_ERROR, spelled)
            _walk(member, field.type, which)


@functools.cache  # 0.2 ms for the Settings' each time
def _shape(decoder: msgspec.json.Decoder) -> msgspec.inspect.Type:
    return msgspec.inspect.type_info(decoder.type)


_FIRST, _LATER = "the first message", "a later message"


def _decode(decoder: msgspec.json.Decoder, message: bytes, reason: str, which: str = _FIRST):
    """`message` as `decoder` reads it, refused (1002, `reason`) when it does not
    decode. Refused too when the provider's parser could read other models than
    msgspec does: a member named twice in any object (msgspec keeps the last, other
    parsers the first), or on the way to a field read here a name that is the field's
    in another case (msgspec skips it, Go's encoding/json reads it)."""
    try:
        decoded = decoder.decode(message)
        # Numbers kept as text: int() refuses over 4,300 digits, and no value is read here.
        tree = json.loads(message, object_pairs_hook=_once, parse_int=str)
    # RecursionError: nested deeper than a parser goes; UnicodeDecodeError: a binary
    # frame's bytes not UTF-8 where msgspec skipped them.
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise Refused(CloseCode.PROTOCOL_ERROR, reason) from None
    except _Twice:
        raise Refused(CloseCode.PROTOCOL_ERROR, f"{which} names a member twice") from None
    _walk(tree, _shape(decoder), which)
    return decoded


# Model names are short identifiers; a first message may be a megabyte long,
# and the model goes into log lines and metric labels.
MAX_MODEL_CHARS = 256


def _valid(model: str) -> bool:
    return 0 < len(model) <= MAX_MODEL_CHARS and not any(c < " " or c == "\x7f" for c in model)


def setup_model(message: bytes) -> tuple[str]:
    """The model a Gemini `setup` message names, without its `models/` prefix."""
    setup = _decode(_setup, message, "the first message must be a setup message naming the model")
    if _holds_key(message):  # say as the model: it would be logged, labelled and sent to Google
        raise Refused(CloseCode.FORBIDDEN, "a virtual key in the first message")
    model = setup.setup.model.removeprefix("models/")
    if not _valid(model):
        raise Refused(CloseCode.PROTOCOL_ERROR, "setup names no valid model")
    return (model,)


class _Transcription(msgspec.Struct):
    model: str | None = None


class _AudioInput(msgspec.Struct):
    transcription: _Transcription | None = None


class _Audio(msgspec.Struct):
    input: _AudioInput | None = None


class _Session(msgspec.Struct):
    type: str | None = None
    model: str | None = None  # read in later messages only
    audio: _Audio | None = None  # GA
    input_audio_transcription: _Transcription | None = None  # beta


class _SessionEvent(msgspec.Struct):  # a client's update, or the provider's answer
    type: str
    session: _Session | None = None


_session_event = msgspec.json.Decoder(_SessionEvent)


def transcription_model(message: bytes) -> tuple[str, ...]:
    """The transcription model an OpenAI transcription session's first message names:
    GA `session.update` with `session.type` "transcription" and
    `session.audio.input.transcription.model`, or beta `transcription_session.update`
    with `session.input_audio_transcription.model`. Empty: it names none (another
    event, or an update without a model)."""
    return _transcription(message, _FIRST)


def later_transcription(message: bytes) -> tuple[str, ...]:
    """The transcription model a later message of a transcription session names: as
    in the first, but in any `session.update` (OpenAI may take one that leaves out the
    session's type)."""
    return _transcription(message, _LATER)


def provider_transcription(message: bytes) -> str | None:
    """The transcription model OpenAI's `session.created` / `session.updated` name (a
    beta transcription session's `transcription_session.*`): the session as it now is,
    the provider's word, not the client's update, which it may refuse. None: another
    event, none named, or one that may not become a label (_valid, a secret)."""
    try:
        event = _session_event.decode(message)
    except (msgspec.DecodeError, RecursionError):
        return None
    if event.type.removeprefix("transcription_") not in ("session.created", "session.updated"):
        return None
    session = event.session or _Session()
    ga = session.audio.input.transcription if session.audio and session.audio.input else None
    named = ga or session.input_audio_transcription
    model = named.model if named else None
    # A secret in it (the provider quoting what it was sent) would go into a close
    # reason, a log line and a label: it is no model of ours.
    return model if model is not None and _valid(model) and redact(model) == model else None


def _transcription(message: bytes, which: str) -> tuple[str, ...]:
    event = _decode(_session_event, message, f"{which} must be a JSON client event", which)
    if _holds_key(message):  # say as the model: refused, it would be logged and labelled
        raise Refused(CloseCode.FORBIDDEN, f"a virtual key in {which}")
    session = event.session or _Session()
    ga = session.audio.input.transcription if session.audio and session.audio.input else None
    beta = session.input_audio_transcription
    named: tuple[_Transcription | str | None, ...] = ()
    if which is _LATER:
        # Whichever shape, and a session model, in case OpenAI takes them here too.
        if event.type in ("session.update", "transcription_session.update"):
            named = (ga, beta, session.model)
    elif event.type == "session.update" and session.type == "transcription":
        named = (ga,)
    elif event.type == "transcription_session.update":
        named = (beta,)
    models = tuple(
        m for m in (n.model if isinstance(n, _Transcription) else n for n in named) if m is not None
    )
    if not all(map(_valid, models)):
        raise Refused(CloseCode.PROTOCOL_ERROR, "the session update names no valid transcription model")
    return models


class _Backend(msgspec.Struct):
    model: str | None = None


class _Delegation(msgspec.Struct):
    responses: _Backend | None = None
    decisions: _Backend | None = None


class _LiveSession(msgspec.Struct):
    model: str | None = None
    delegation: _Delegation | None = None


class _LiveEvent(msgspec.Struct):
    type: str
    session: _LiveSession | None = None


_live_event = msgspec.json.Decoder(_LiveEvent)


def live_models(message: bytes) -> tuple[str, ...]:
    """The models an OpenAI Live `session.start` names: the Live model (the session's
    label), then its delegated backend's (`delegation.responses.model` or
    `delegation.decisions.model`), which it bills too. Empty: it names none (another
    event; OpenAI refuses it). A virtual key in it (say as a delegated MCP server's
    `authorization`) is refused: it would go to OpenAI and on."""
    return _live(message, _FIRST, "session.start")


def later_live(message: bytes) -> tuple[str, ...]:
    """The models a later message of a Live session (or a fork or sideband) names: a
    `session.update`'s (the Live model cannot change, the delegated backend's can) or
    another `session.start`'s; refused if it holds a virtual key."""
    return _live(message, _LATER, "session.update", "session.start")


def _live(message: bytes, which: str, *naming: str) -> tuple[str, ...]:
    """The models of a message of one of the `naming` types."""
    event = _decode(_live_event, message, f"{which} must be a JSON client event", which)
    if _holds_key(message):
        raise Refused(CloseCode.FORBIDDEN, f"a virtual key in {which}")
    session = event.session if event.type in naming else None
    if session is None:
        return ()
    delegation = session.delegation or _Delegation()
    models = tuple(
        m
        for m in (
            session.model,
            delegation.responses.model if delegation.responses else None,
            delegation.decisions.model if delegation.decisions else None,
        )
        if m is not None
    )
    if not all(map(_valid, models)):
        raise Refused(CloseCode.PROTOCOL_ERROR, f"{event.type} names no valid model")
    return models


class _AgentProvider(msgspec.Struct):
    model: str | None = None
    model_id: str | None = None  # ElevenLabs' and Cartesia's speak providers name it so


class _Stage(msgspec.Struct):
    provider: _AgentProvider | None = None


class _Agent(msgspec.Struct):
    listen: _Stage | None = None
    think: _Stage | list[_Stage] | None = None  # a list: fallbacks, in order
    speak: _Stage | list[_Stage] | None = None


class _Settings(msgspec.Struct):
    type: str
    agent: _Agent | str  # a string: a stored agent configuration's id


_settings = msgspec.json.Decoder(_Settings)


_ESCAPE = re.compile(rb"\\u00([0-7][0-9a-fA-F])")  # an ASCII character JSON-escaped


_KEY = KEY_PREFIX.encode()


def _holds_key(message: bytes) -> bool:
    """Whether a message holds a virtual key, as written or escaped (`\\u005f`): the
    provider reads the value the escape stands for. Searched in the bytes, escapes
    undone, not in a parse: the provider's parser may read what msgspec refuses
    (Python's json reads NaN) or keep the first of a member named twice."""
    return _KEY in _ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), message)


def keyless(message: bytes) -> tuple[str, ...]:
    """A first message from which the provider would also read a key (ElevenLabs'
    text-to-speech `xi_api_key`, `authorization`) must hold no virtual key: it would go
    upstream and be tried there. It names no model (the URL's is checked)."""
    if _holds_key(message):
        raise Refused(CloseCode.FORBIDDEN, "a virtual key in the first message")
    return ()


def agent_settings(message: bytes) -> tuple[str, ...]:
    """The models a Deepgram agent's `Settings` names: think's (the session's label
    first), then listen's and speak's, each fallback's too. Empty: it names none (a
    stored agent's id; stages that leave the model to Deepgram, AWS Polly's voice)."""
    not_settings = "the first message must be a Settings message"
    settings = _decode(_settings, message, not_settings)
    if settings.type != "Settings":
        raise Refused(CloseCode.PROTOCOL_ERROR, not_settings)
    if _holds_key(message):  # e.g. as a think endpoint's key: it would go upstream
        raise Refused(CloseCode.FORBIDDEN, "a virtual key in the Settings message")
    agent = settings.agent
    if isinstance(agent, str):
        return ()
    return _stage_models((agent.think, agent.listen, agent.speak), "Settings")


class _AgentUpdate(msgspec.Struct):
    type: str
    think: _Stage | list[_Stage] | None = None  # UpdateThink
    speak: _Stage | list[_Stage] | None = None  # UpdateSpeak
    listen: _Stage | None = None  # UpdateListen
    think_live: _Stage | None = None  # UpdateThink_Live


_agent_update = msgspec.json.Decoder(_AgentUpdate)
_UPDATES = frozenset({"UpdateThink", "UpdateSpeak", "UpdateListen", "UpdateThink_Live"})


def later_agent(message: bytes) -> tuple[str, ...]:
    """The models a later message of a Deepgram agent names (`UpdateThink`,
    `UpdateSpeak`, `UpdateListen`, `UpdateThink_Live`); refused if it holds a virtual
    key (a think endpoint's, as in `Settings`)."""
    update = _decode(_agent_update, message, "a later message must be a JSON agent message", _LATER)
    if _holds_key(message):
        raise Refused(CloseCode.FORBIDDEN, "a virtual key in a later message")
    if not update.type.startswith("Update"):
        return ()
    # The refusal names the type only if it is one of Deepgram's: the client's own is
    # any text (a megabyte of it), and the reason goes into log lines.
    naming = update.type if update.type in _UPDATES else _LATER
    return _stage_models((update.think, update.think_live, update.listen, update.speak), naming)


def may_name(message: bytes) -> bool:
    """Whether a later message could name a model or hold a virtual key at all. Most
    (audio appends) cannot, and are not parsed. An escape could spell anything;
    without one, a member named model (or model_id), in any case, is written as a
    quote and those five letters."""
    if b"\\" in message or _KEY in message:
        return True
    at = message.find(b'"')
    while at >= 0:
        if message[at + 1 : at + 6].lower() == b"model":
            return True
        at = message.find(b'"', at + 1)
    return False


def _stage_models(stages: tuple[_Stage | list[_Stage] | None, ...], naming: str) -> tuple[str, ...]:
    """The models the agent's stages name, each fallback's too, in order."""
    flat: list[_Stage] = []
    for stage in stages:
        flat.extend(stage if isinstance(stage, list) else [] if stage is None else [stage])
    models = tuple(
        named
        for stage in flat
        if stage.provider is not None
        for named in (stage.provider.model, stage.provider.model_id)
        if named is not None
    )
    if not all(map(_valid, models)):
        raise Refused(CloseCode.PROTOCOL_ERROR, f"{naming} names no valid model")
    return models
