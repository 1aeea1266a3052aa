"""One session's lifecycle: read the upgrade request, decide, open the upstream,
answer 101, hand both sockets to the relay, and report the end.

Data flows one way: listener -> ClientHandshake -> handshake.decide -> upstream
connect -> Relay. Nothing here touches frame bytes once the relay has started.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import itertools
import logging
import socket
import ssl
import sys
import time
from collections.abc import Callable
from typing import Protocol

import msgspec
from websockets.http11 import Request

from . import _relay, held, logs, signed_urls, tlsleg
from .config import Limits
from .handshake import Accept, Admission, Close, Refuse, decide, refuse
from .httpread import BadRequest, RequestReader
from .keys import KeyEntry, KeySet, Rejection
from .metering import Meter, Usage
from .providers import BadPath, audio_rate, bare_path, dialect, meter, normalise_path
from .routing import RouteError, Router
from .upstream import Balancer, Health, UpstreamError

__all__ = ["ClientHandshake", "Host", "SessionInfo", "Slots", "linger", "unkeyed"]

log = logging.getLogger("conduit.session")
_ids = itertools.count(1)
# The lines of connections without a key (refusals, timeouts, failed TLS handshakes),
# which a peer makes as fast as it connects: a fixed number a second of each kind.
unkeyed = logs.Limited(log, ("event", "status", "reason"))


class SessionInfo:
    """What the process knows of a live session. Idle sessions are held by the
    thousand: every field here is paid for by each of them."""

    __slots__ = (
        "number",
        "key",
        "key_id",
        "model",
        "provider",
        "started",
        "relay",
        "usage",
        "seen_activity",
        "active_at",
        "upstream",
        "trial",
        "public_agent",
        "audio_bytes",
        "audio_rate",
        "dialect",
        "metered",
    )

    def __init__(self, key: KeyEntry, model: str | None, provider: str, public_agent: str | None = None):
        self.number = next(_ids)
        self.key = key  # the entry it was admitted with (rechecked by hash)
        self.key_id = key.id
        # Sessions mostly ask for a few models: one string each, not one per session.
        self.model = sys.intern(model) if model else model
        self.provider = provider
        self.started = time.monotonic()
        self.relay: _relay.Relay | None = None
        self.usage: Usage | None = None  # made at the first usage report
        self.seen_activity = 0  # bytes relayed at the last idle check (Relay.activity)
        self.active_at = self.started
        self.upstream: Health | None = None  # the deployment's Health; released at the end
        # While its connect's verdict is owed (Sidecar.judge): whether it was the probe.
        self.trial: bool | None = None
        self.public_agent = public_agent  # admitted without a key, as this agent's session
        self.audio_bytes = 0  # client->provider binary payload the governor has counted
        self.audio_rate: int | None = None  # its bytes per second, if not [audio]'s
        self.dialect = ""  # the events its client reads (providers.dialect)
        self.metered: Meter | None = None  # how its usage is read (providers.meter), set at its relay

    @property
    def id(self) -> str:
        return f"s{self.number}"


class Slots:
    """The `max_connections` slots of connections without a session: sending their
    upgrade request (on the wss listener, from the TLS handshake on), refused after
    the upgrade and awaiting their close (`_Drain`), or waiting for the provider's
    answer to a REST call (`_rest`). Each holds at most `max_request_bytes` plus one
    read, so what peers can make the sidecar hold, and how many provider calls they
    can have in progress, has a fixed bound."""

    __slots__ = ("limit", "taken")

    def __init__(self, limit: int):
        self.limit = limit
        self.taken = 0

    def take(self) -> bool:
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def give(self) -> None:
        self.taken -= 1


class Host(Protocol):
    """What a session needs from the process that serves it (server.Sidecar is one).
    Sessions know nothing else of it: data flows from the listener to the relay, and
    events (admission, release, the end) flow back only through these members."""

    limits: Limits
    router: Router
    keyset: KeySet
    balancer: Balancer
    pending: Slots
    linger: Callable[[asyncio.Transport], bool]  # `linger` in the host's pool of lingering closes
    opening: set[asyncio.Task]  # the tasks of open_session under way (a stop cancels them)
    draining: bool  # SIGTERM came: new sessions (and signed URLs for them) are refused
    closing: bool  # the drain has ended: sessions still opening get 1001, not a relay
    holding: set[held.Reader]  # first messages awaited (the drain's end answers them at once)

    signed_urls: signed_urls.SignedUrls

    def admission(self) -> Admission: ...
    async def govern(self, info: SessionInfo) -> tuple[int, str] | None: ...
    def started(self, info: SessionInfo) -> None: ...
    def auth_failed(self, why: Rejection) -> None: ...
    def count(self, result: str) -> None: ...
    def failed(self, closed: bool) -> None: ...
    def signed_url(self, status: int) -> None: ...
    def tls_leg(self, leg: str, kernel: bool) -> None: ...
    def rejected(self, decision: Close, info: SessionInfo | None = None) -> None: ...
    def reserve(self, info: SessionInfo) -> None: ...
    def release(self, info: SessionInfo) -> None: ...
    def greeting_failed(self, info: SessionInfo, refused: held.Refused) -> None: ...
    def connected(self, info: SessionInfo, seconds: float) -> None: ...
    def session_ended(self, relay: _relay.Relay) -> None: ...
    def provider_message(self, relay: _relay.Relay, message: bytes) -> None: ...
    def client_message(self, later, relay: _relay.Relay, message: bytes) -> None: ...


# A lingering close (nginx's lingering_close) lasts this long at most, and reads this
# much at most: more than Linux's default socket buffers hold (6 MiB received, 4 MiB
# sent), all a peer that sent until they were full and only then reads can have left;
# a flood's cost is bounded.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 16 << 20


class _Linger(asyncio.BufferedProtocol):
    """A connection in its lingering close: our side has ended after the answer (an
    HTTP refusal, a close frame), and what the peer still sends is read into the
    relay's shared buffer and dropped until its end, _LINGER_BYTES or _LINGER_SECONDS;
    then the socket closes. Closed with bytes unread, the kernel would answer them with
    a reset, which can destroy the answer before the peer reads it. It holds a slot
    of the pool `linger` was given until then, and no buffer."""

    __slots__ = ("slots", "transport", "left", "timer")

    get_buffer = staticmethod(_relay.read_buffer)

    def __init__(self, slots: Slots, transport):
        self.slots = slots
        self.transport = transport
        self.left = _LINGER_BYTES
        self.timer = asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.close)

    def buffer_updated(self, nbytes):
        self.left -= nbytes
        if self.left <= 0:
            self.transport.close()

    def eof_received(self):
        return False  # the peer's end: the socket closes

    def connection_lost(self, exc):
        self.timer.cancel()
        self.slots.give()


def linger(slots: Slots, transport) -> bool:
    """Close `transport`, its answer written: lingering (_Linger) in a slot of `slots`,
    or at once when none is free, the transport is closing, or it is a TLS stream (whose
    records would need reading). True when it lingers: the transport's protocol is then
    _Linger, the caller's hears no more of it."""
    if (
        isinstance(transport, tlsleg.TLSStream)
        or transport.is_closing()
        or not transport.can_write_eof()
        or not slots.take()
    ):
        transport.close()
        return False
    transport.set_protocol(_Linger(slots, transport))
    transport.write_eof()
    transport.resume_reading()  # (paused by a violation, `early`'s bound, or a peer not reading)
    return True


def _refused(host: Host, refusal: Refuse, result: str = "bad_request") -> None:
    """A connection refused with an HTTP status (by the parser, by decide, or for want
    of a slot): counted and logged alike."""
    host.count(result)
    unkeyed.info(
        "handshake refused",
        {"event": "refused", "status": refusal.response.status_code, "reason": refusal.reason},
    )


_NO_SLOT = "too many connections in their handshake"


def _no_slot(host: Host, transport) -> None:
    """All `pending` slots are taken: 503 at once (the caller closes)."""
    refusal = refuse(503, _NO_SLOT)
    _refused(host, refusal, "too_many_handshakes")
    transport.write(refusal.response.serialize())


class ClientHandshake(asyncio.Protocol):
    """Reads the client's upgrade request within the size and time limits, then hands
    the connection to `open_session`, which takes the request from it. It holds one
    of the host's `pending` slots while it reads; with none free a connection gets 503
    at once and lingers as other refusals do (`linger`); on the wss listener it is
    dropped (no TLS handshake is spent on it).

    While the session opens it goes on reading, only to notice a client that leaves
    (its end or a reset cancels the opening, whose upstream is then dropped): a client
    must wait for the 101, so what one sends meanwhile is kept in `early` for the relay,
    up to `max_request_bytes` of it (and one read past them) beyond a held first
    message, where reading pauses: a pause at its first bytes would hide the end of a
    client that sent a frame with its request."""

    __slots__ = (
        "host",
        "transport",
        "reader",
        "timer",
        "task",
        "early",
        "pause_at",
        "rest",
        "request",
    )

    def __init__(self, host: Host):
        self.host = host
        self.task: asyncio.Task[None] | None = None
        self.reader: RequestReader | None = None  # set while the request is read
        self.early = bytearray()  # what the client sent past its request
        self.pause_at = host.limits.max_request_bytes  # the length of `early` that pauses reading
        self.rest = False  # the request is a REST call (see _is_rest), not an upgrade
        self.request: Request | None = None  # read, until open_session takes it

    def connection_made(self, transport):
        self.transport = transport
        host = self.host
        limit = host.limits.handshake_timeout_seconds
        self.timer = asyncio.get_running_loop().call_later(limit, self._timeout)
        if host.pending.take():
            self.reader = RequestReader(host.limits.max_request_bytes)
            return
        if isinstance(transport, tlsleg.TLSStream):
            # No TLS handshake is spent on it, so no 503 can reach it: dropped, and
            # its line says so.
            host.count("too_many_handshakes")
            unkeyed.info("connection dropped", {"event": "dropped", "reason": _NO_SLOT})
            self.timer.cancel()
            transport.close()
            return
        # The request is still to come: closed at once, the socket would answer it
        # with a reset, which can destroy the 503 before the client reads it.
        _no_slot(host, transport)
        self.timer.cancel()
        host.linger(transport)

    def _done_reading(self) -> None:
        """The request is read (or refused), or the connection ended: its slot is free."""
        self.reader = None
        self.host.pending.give()
        self.timer.cancel()

    def refused(self, answer: bytes) -> None:
        """A refusal decided once the request was read (decide's 400, 404, 426): it
        lingers as the parser's do."""
        self.transport.write(answer)
        self.early = bytearray()  # the relay's, and there is none
        self.host.linger(self.transport)

    def _timeout(self):
        seconds = self.host.limits.handshake_timeout_seconds
        self.host.count("handshake_timeout")
        transport = self.transport
        # A client stuck in the wss listener's TLS handshake, or one that never finished
        # its request (slowloris): told apart, each its own kind of line.
        stage = (
            "tls_handshake"
            if isinstance(transport, tlsleg.TLSStream) and not transport.handshaken
            else "request"
        )
        unkeyed.info(
            "handshake timed out", {"event": "handshake_timeout", "reason": stage, "seconds": seconds}
        )
        transport.abort()

    def data_received(self, data):
        reader = self.reader
        if reader is None:
            if self.task is not None:  # the session opens (or the connection closes)
                self._keep(data)
            return
        try:
            request = reader.feed(data)
        except BadRequest as exc:
            refusal = refuse(exc.status, str(exc))
            _refused(self.host, refusal)
            self.transport.write(refusal.response.serialize())
            self._done_reading()
            self.host.linger(self.transport)
            return
        if request is None:
            return
        self._done_reading()
        self.rest = _is_rest(request)
        self.request = request
        if reader.early:
            self._keep(reader.early)
        task = self.task = asyncio.get_running_loop().create_task(
            open_session(self.host, self.transport, self)
        )
        self.host.opening.add(task)
        task.add_done_callback(self.host.opening.discard)

    def _keep(self, data) -> None:
        """Bytes the client sent past its request, for the relay."""
        self.early += data
        if len(self.early) >= self.pause_at:
            self.transport.pause_reading()

    def pause_writing(self):
        # A client that reads none of what it is sent (on uvloop's TLS transport, the
        # answers OpenSSL makes to some of its records) is read no further meanwhile.
        if self.reader is not None:
            self.transport.pause_reading()

    def resume_writing(self):
        if self.reader is not None:
            self.transport.resume_reading()

    def eof_received(self):
        # An HTTP client may end its side once its request is sent: a REST call is still
        # answered. A WebSocket client that ends its side before its 101 is leaving.
        return self.task is not None and self.rest

    def connection_lost(self, exc):
        if isinstance(exc, ssl.SSLError) and self.reader is not None:
            # The wss listener's handshake failed: most often a client that does not
            # trust the listener's CA (its alert's name says so), which only this shows.
            self.host.count("tls_failed")
            unkeyed.info("tls handshake failed", {"event": "tls_failed", "reason": exc.reason})
        if self.reader is not None:
            self._done_reading()
        if self.task is not None and not self.task.done():
            self.task.cancel()


class _Drain(asyncio.Protocol):
    """After a post-upgrade rejection our close frame is out: what the client still
    sends is scanned by the relay's scanner (which holds at most one frame header)
    and discarded, until its close frame (then the socket is closed) or a violation
    (then it closes lingering, `linger`: the client may still be sending). Nothing a
    rejected client sends is kept, however much it sends, and nothing here forms a
    reference cycle: the connection is freed as soon as it ends. It holds the
    `pending` slot its caller took until then."""

    def __init__(self, slots: Slots, transport, timeout: float, linger: Callable[[asyncio.Transport], bool]):
        self.slots: Slots | None = slots
        self.transport = transport
        self.linger = linger
        self.scanner = _relay.Scanner(True, record=False)
        self.timer = asyncio.get_running_loop().call_later(timeout, transport.abort)

    def data_received(self, data):
        scanner = self.scanner
        scanner.feed_bytes(data)
        if scanner.verdict_code:
            self.connection_lost(None)  # its slot and timer: a lingering close needs neither
            self.linger(self.transport)
        elif scanner.counters()[0][_CLOSE]:
            self.transport.close()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.timer.cancel()
        if self.slots is not None:
            self.slots.give()
            self.slots = None


_CLOSE = _relay.KIND_NAMES.index("close")
_U2C = _relay.DIRECTION_NAMES.index("upstream_to_client")


def _close_after_upgrade(
    host: Host, transport, decision: Close, early: bytes, answered: bool = False, ended: bool = False
):
    """Our close frame (after the 101 unless `answered`), then the client's awaited in
    a _Drain, unless it has `ended` (its close already read): then the
    closing handshake is done and the connection is closed at once."""
    if not answered:
        transport.write(decision.response.serialize())
    transport.write(_relay.close_frame(decision.code, decision.reason, False))
    if ended:
        transport.close()
    if transport.is_closing():
        return  # the client is gone or going: no close of its to wait for
    if not host.pending.take():
        transport.close()  # no slot to wait for the client's close in; it has ours
        return
    drain = _Drain(host.pending, transport, host.limits.close_timeout_seconds, host.linger)
    transport.set_protocol(drain)
    if early:
        drain.data_received(early)
    if not transport.is_closing():
        transport.resume_reading()


async def _hold_first(
    host: Host, transport, decision: Accept, info: SessionInfo, early: bytes
) -> tuple[Accept, bytes] | None:
    """Read the client's first message (Gemini's setup, an OpenAI transcription
    session's update, Deepgram's agent Settings, ElevenLabs' first text-to-speech
    message; the 101 is out) and check every model it names (where the URL named none,
    one must be named for a key with allowed_models), and that it holds no virtual key
    where the provider reads one from it. Returns the decision with its model and the
    raw bytes read so far (for the relay), or None when the session was closed."""
    limits = host.limits
    assert decision.hold is not None  # the caller holds only such sessions
    models: tuple[str, ...] = ()
    ended = False
    try:
        message, early = await held.read_first(
            transport,
            early,
            min(limits.first_message_bytes, limits.max_message_bytes),
            limits.handshake_timeout_seconds,
            host.holding,
        )
        models = decision.hold(message)
        refusal = None
        barred = [m for m in models if not decision.key.allows_model(m)]
        if not models and decision.model is None and decision.key.allowed_models is not None:
            refusal = "the first message must name a model for this key"
        elif barred:
            refusal = f"model {barred[0]!r} not allowed for this key"
        failed = (
            Close(decision.response, _relay.CloseCode.FORBIDDEN, refusal, decision.key) if refusal else None
        )
    except held.Refused as exc:
        if exc.gone:  # a reset: nothing to answer (a write to its closed handle raises)
            _gone(host, info)
            return None
        failed = Close(decision.response, exc.code, str(exc), decision.key)
        ended = exc.ended
    if failed is not None:
        host.release(info)
        host.rejected(failed, info)
        # The client's bytes go to the drain (it waits for their close), unless they
        # were what broke the rules.
        _close_after_upgrade(
            host, transport, failed, early if failed.code == _relay.CloseCode.FORBIDDEN else b"", True, ended
        )
        return None
    if not models:
        return decision, early
    info.model = models[0]
    return msgspec.structs.replace(decision, model=models[0]), early


async def _greet(
    host: Host,
    transport,
    upstream,
    upstream_early: bytes,
    decision: Accept,
    info: SessionInfo,
    client: ClientHandshake,
) -> tuple[Accept, bytes, bytes, _relay.Scanner] | None:
    """Pass the provider's first message (Deepgram's agent Welcome) to the client, then
    hold the client's first message as _hold_first does. Returns the decision, the
    client's raw bytes, the provider's after its first message (for the relay) and the
    greeting's frames scanned (for the relay's counts, Relay.count_sent), or None when
    the session was closed (and the upstream dropped)."""
    limits = host.limits
    try:
        greeting, upstream_early = await held.read_greeting(
            upstream,
            upstream_early,
            min(limits.first_message_bytes, limits.max_message_bytes),
            limits.handshake_timeout_seconds,
            host.holding,
        )
    except held.Refused as exc:
        upstream.abort()
        host.greeting_failed(info, exc)
        host.release(info)
        failed = Close(decision.response, exc.code, str(exc), decision.key)
        host.rejected(failed, info)
        if exc.close is not None:  # counted and logged as 1014; the client reads the provider's
            failed = msgspec.structs.replace(failed, code=exc.close[0], reason=exc.close[1])
        _close_after_upgrade(host, transport, failed, bytes(client.early), True)
        return None
    transport.write(greeting)
    sent = _relay.Scanner(False, record=False)
    sent.feed_bytes(greeting)
    # What the client sent meanwhile, read by its handshake protocol until now.
    held_first = await _hold_first(host, transport, decision, info, bytes(client.early))
    if held_first is None:
        upstream.abort()  # the client's first message never went: nothing to close cleanly
        return None
    return *held_first, upstream_early, sent


def _late(host: Host, decision: Accept, info: SessionInfo) -> Close | None:
    """The close of a session admitted earlier that must not start now: the drain is
    over (close_all tells only sessions with a relay), or its key was revoked meanwhile."""
    if host.closing:
        return Close(decision.response, _relay.CloseCode.GOING_AWAY, "going away", decision.key)
    _, revoked = host.keyset.recheck(info.key, dt.datetime.now(dt.UTC), info.public_agent)
    if revoked is None:
        return None
    return Close(decision.response, _relay.CloseCode.AUTH_FAILED, revoked.value, decision.key, revoked)


def _ended_late(
    host: Host, transport, decision: Accept, info: SessionInfo, upstream, early: bytearray, answered: bool
) -> bool:
    """Whether a session admitted earlier was closed because it must not start now (see
    _late). `upstream` is None while none is open yet."""
    late = _late(host, decision, info)
    if late is None:
        return False
    _close_late(host, transport, late, info, upstream, early, answered)
    return True


def _close_late(
    host: Host, transport, late: Close, info: SessionInfo, upstream, early: bytearray, answered: bool
) -> None:
    host.release(info)
    if upstream is not None:
        upstream.abort()
    host.rejected(late, info)
    _close_after_upgrade(host, transport, late, bytes(early), answered)


def _cancelled(
    host: Host, transport, decision: Accept, info: SessionInfo, upstream, early: bytearray, answered: bool
) -> None:
    """The opening was cancelled: by the client's leaving (its connection is lost), or
    by the process's stop (a second signal), which ends it as the drain's end does."""
    if transport.is_closing():
        _gone(host, info, upstream)
        return
    late = Close(decision.response, _relay.CloseCode.GOING_AWAY, "going away", decision.key)
    _close_late(host, transport, late, info, upstream, early, answered)


def _gone(host: Host, info: SessionInfo, upstream=None) -> None:
    """The client left before its session started: nothing to answer, but a line that
    says so, the session's only one."""
    host.release(info)
    host.count("client_gone")
    logs.info(
        log,
        "client left while its session opened",
        {
            "event": "client_gone",
            "session_id": info.id,
            "key_id": info.key_id,
            "model": info.model,
            "provider": info.provider,
        },
    )
    if upstream is not None:
        upstream.abort()


def bound_kernel_buffers(sock, size: int) -> None:
    """A socket's kernel send and receive buffers fixed at `size`
    (limits.socket_buffer_bytes). On a listening socket, for every connection it
    accepts (the kernel copies them, before any byte). A provider's socket is bounded
    once its handshakes are done: until then it carries a few KiB, and buffers may
    shrink later (the kernel holds what it queued and takes no more)."""
    if sock is None:  # (a transport without one: nothing to bound)
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:  # a socket already reset: the relay finds it so
            pass


def _is_rest(request: Request) -> bool:
    """Whether the request is the REST call some SDKs make before a session
    (ElevenLabs' signed URL); a path that is not normal is decide's to answer."""
    if bare_path(request.path) != signed_urls.PATH:
        return False  # most requests: no need for normalise_path's checks
    try:
        return normalise_path(request.path)[0] == signed_urls.PATH
    except BadPath:
        return False


async def _rest(host: Host, transport, request: Request) -> None:
    """Answer the REST call and close. It holds a `pending` slot while the provider is
    asked: a key holder cannot start provider calls without bound (none free: 503)."""
    if not host.pending.take():
        _no_slot(host, transport)
        host.linger(transport)
        return
    try:
        response = await signed_urls.answer(host, request, transport.get_extra_info("sslcontext") is not None)
    except Exception:  # a bug of ours: the client gets a status, never a hang
        log.exception("signed url failed", extra={"event": "signed_url_error"})
        response = refuse(500, "internal error").response
    finally:
        host.pending.give()
    # Any peer can call at will, a key or none: limited, as refusals are (the line
    # names no caller, so a `not_logged` count of it loses nothing).
    unkeyed.info("signed url", {"event": "signed_url", "status": response.status_code})
    host.signed_url(response.status_code)
    transport.write(response.serialize())
    host.linger(transport)  # a refusal, or a client that sent more than it is answered


class _Opening:
    """How far `_open` got: what the last-resort cleanup of a bug must undo."""

    __slots__ = ("info", "upstream", "answered", "relayed")

    def __init__(self):
        self.info: SessionInfo | None = None  # reserved (released by the relay once it runs)
        self.upstream = None  # connected, not yet the relay's
        self.answered = False  # the 101 is out
        self.relayed = False  # the relay has both legs


async def open_session(host: Host, transport, client: ClientHandshake):
    """Open the session that the request `client` read asks for on `transport`. A bug
    of ours on the way (an exception nothing here expects) is logged with its
    traceback and ends the session, 500 before the 101 and 1011 after it, with
    whatever it held released: the client is never left waiting on a socket nobody
    reads."""
    opening = _Opening()
    try:
        await _open(host, transport, client, opening)
    except Exception:
        log.exception("session failed: a bug of ours", extra={"event": "internal_error"})
        if opening.relayed:
            transport.abort()  # the relay sees its leg lost and ends the session
            return
        if opening.info is not None:
            host.release(opening.info)
        if opening.upstream is not None:
            opening.upstream.abort()
        gone = transport.is_closing()
        host.failed(opening.answered and not gone)
        if gone:
            return  # the client is gone: a write to a lost transport would raise here
        if opening.answered:
            transport.write(_relay.close_frame(_relay.CloseCode.INTERNAL_ERROR, "internal error", False))
        else:
            transport.write(refuse(500, "internal error").response.serialize())
        host.linger(transport)


async def _open(host: Host, transport, client: ClientHandshake, opening: _Opening):
    request, client.request = client.request, None
    assert request is not None
    if client.rest:
        await _rest(host, transport, request)
        return
    decision = decide(request, host.admission())
    # The decision keeps what the session needs; the parsed request (a few KB of
    # headers) is not held while the provider is slow to answer.
    del request
    if isinstance(decision, Refuse):
        _refused(host, decision)
        client.refused(decision.response.serialize())
        return
    if isinstance(decision, Close):
        host.rejected(decision)
        _close_after_upgrade(host, transport, decision, bytes(client.early))
        return
    if isinstance(transport, tlsleg.TLSStream):
        transport.unguard()  # a key holder's: read as the session's own limits say

    info = SessionInfo(
        decision.key,
        decision.model or decision.modelless,
        decision.route.name,
        decision.model if decision.anonymous else None,
    )
    info.audio_rate = audio_rate(decision.route.name, decision.query)
    info.dialect = dialect(decision.route.name, decision.kept)
    host.reserve(info)
    opening.info = info
    answered = decision.hold is not None and not decision.greeted  # 101 before the upstream
    try:
        refusal = await host.govern(info)
        if refusal is not None:
            host.release(info)
            refused = Close(decision.response, *refusal, decision.key)
            host.rejected(refused, info)
            _close_after_upgrade(host, transport, refused, bytes(client.early))
            return
        if answered:
            # govern may have waited for Redis: the hold must not begin after the drain's end
            if _ended_late(host, transport, decision, info, None, client.early, False):
                return
            opening.answered = True
            transport.write(decision.response.serialize())
            held_first = await _hold_first(host, transport, decision, info, bytes(client.early))
            if held_first is None:
                return
            decision, raw = held_first
            # Watched again while the upstream opens: the held message and what came
            # with it are the relay's first bytes.
            client.early = bytearray(raw)
            client.pause_at = len(raw) + host.limits.max_request_bytes  # not paused by a long first message
            del raw, held_first  # one copy held while the upstream opens, not two
            # The hold took up to a handshake timeout: a session that must not start
            # now never reaches the provider (checked again once it has answered).
            if _ended_late(host, transport, decision, info, None, client.early, True):
                return
            transport.set_protocol(client)
            transport.resume_reading()
        started = time.monotonic()
        try:
            upstream, subprotocol, upstream_early, info.upstream, info.trial = await host.balancer.connect(
                decision, functools.partial(_late, host, decision, info), info.id
            )
            opening.upstream = upstream
            info.provider = info.upstream.target.provider  # after a failover: the next one
        except (UpstreamError, RouteError) as exc:
            # The key may have gone, or the drain ended, while deployments were tried:
            # answered as such (the balancer stops at its next attempt), not as their failure.
            if _ended_late(host, transport, decision, info, None, client.early, answered):
                return
            code = exc.code if isinstance(exc, RouteError) else _relay.CloseCode.UPSTREAM_FAILED
            host.release(info)
            failed = Close(decision.response, code, str(exc), decision.key)
            host.rejected(failed, info)
            _close_after_upgrade(host, transport, failed, bytes(client.early), answered)
            return
        host.connected(info, time.monotonic() - started)
    except asyncio.CancelledError:  # the client left while we connected, or the process stops
        _cancelled(host, transport, decision, info, None, client.early, opening.answered)
        raise
    if transport.is_closing():  # the client left as the upstream answered
        _gone(host, info, upstream)
        return
    # The drain may have ended, or the key file changed, while the upstream answered.
    if _ended_late(host, transport, decision, info, upstream, client.early, answered):
        return
    response = decision.response
    # The provider's choice wins. When it picks none, the client's first offer (set
    # by decide) stays: browsers fail a handshake that selects none of their offers.
    if not answered:
        if subprotocol is not None:
            if "Sec-WebSocket-Protocol" in response.headers:
                del response.headers["Sec-WebSocket-Protocol"]
            response.headers["Sec-WebSocket-Protocol"] = subprotocol
        transport.write(response.serialize())
        opening.answered = True
    greeting = None
    if decision.greeted:
        try:
            greeted = await _greet(host, transport, upstream, upstream_early, decision, info, client)
        except asyncio.CancelledError:  # the client left while the provider's Welcome was awaited
            _cancelled(host, transport, decision, info, upstream, client.early, True)
            raise
        if greeted is None:
            return
        decision, raw, upstream_early, greeting = greeted
        client.early = bytearray(raw)
        del raw, greeted
        # The Welcome and the Settings took up to two handshake timeouts: close_all may
        # have passed this session (no relay yet to tell), or its key been revoked.
        if _ended_late(host, transport, decision, info, upstream, client.early, True):
            return
    limits = host.limits
    metered = info.metered = meter(info.provider, decision.kept, decision.query)
    relay = _relay.Relay(
        asyncio.get_running_loop(),
        limits.max_message_bytes,
        limits.close_timeout_seconds,
        host.session_ended,
        metered.markers if metered else (),
        host.provider_message,
        meter_binary=bool(metered and metered.binary),
        sniff_bytes=metered.sniff_bytes if metered else 256,
        on_client_message=functools.partial(host.client_message, decision.later) if decision.later else None,
        read_whole_max=limits.first_message_bytes,
    )
    relay.session = info
    info.relay = relay
    if greeting is not None:
        relay.count_sent(_U2C, greeting)  # relayed before the relay was
    transport, client_tls, client_kernel = tlsleg.handover(transport)
    upstream, upstream_tls, upstream_kernel = tlsleg.handover(upstream)
    if client_tls is not None:
        host.tls_leg("client", client_kernel)
    if upstream_tls is not None:
        host.tls_leg("provider", upstream_kernel)
    if limits.socket_buffer_bytes:  # (the client's: as the listener's, since its accept)
        bound_kernel_buffers(upstream.get_extra_info("socket"), limits.socket_buffer_bytes)
    # Resumed before the relay takes over (nothing is read before this coroutine
    # yields): a pause that start() makes, for a violation or backpressure in the bytes
    # read with the handshakes, then stays.
    transport.resume_reading()
    upstream.resume_reading()
    relay.start(
        transport,
        upstream,
        bytes(client.early),
        upstream_early,
        client_tls,
        upstream_tls,
        client_kernel,
        upstream_kernel,
    )
    opening.relayed = True
    host.count("accepted")  # one outcome per handshake: from here a bug is the relay's to end
    host.started(info)
