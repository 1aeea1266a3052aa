"""One session's lifecycle: read the upgrade request, decide, open the upstream,
answer 101, hand both sockets to the relay, and report the end.

Data flows one way: listener -> ClientHandshake -> handshake.decide -> upstream
connect -> Relay. Nothing here touches frame bytes once the relay has started.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import ssl
import time
from typing import Protocol

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.http11 import Request, Response
from websockets.streams import StreamReader

from . import _relay
from .config import Limits
from .handshake import Accept, Admission, Close, Refuse, decide, refuse
from .httpread import BadRequest, RequestReader
from .keys import KeyEntry, KeySet
from .metering import MARKER, Usage
from .routing import RouteError, Router

__all__ = ["ClientHandshake", "Host", "SessionInfo", "UpstreamError", "connect_upstream"]

log = logging.getLogger("conduit.session")
_ids = itertools.count(1)
_MAX_RESPONSE_BYTES = 65536


class UpstreamError(Exception):
    """The upstream could not be opened; the message is the client's close reason."""


class SessionInfo:
    __slots__ = ("id", "key", "key_id", "model", "provider", "started", "relay", "usage",
                 "seen_activity", "active_at")

    def __init__(self, key: KeyEntry, model: str | None, provider: str):
        self.id = f"s{next(_ids)}"
        self.key = key                  # the entry it was admitted with (rechecked by hash)
        self.key_id = key.id
        self.model = model
        self.provider = provider
        self.started = time.monotonic()
        self.relay = None
        self.usage = Usage()
        self.seen_activity = 0          # frames relayed at the last idle check
        self.active_at = self.started


class Host(Protocol):
    """What a session needs from the process that serves it (server.Sidecar is one).
    Sessions know nothing else of it: data flows from the listener to the relay, and
    events (admission, release, the end) flow back only through these members."""

    limits: Limits
    router: Router
    keyset: KeySet

    def admission(self) -> Admission: ...
    def count(self, result: str) -> None: ...
    def rejected(self, decision: Close) -> None: ...
    def reserve(self, info: SessionInfo) -> None: ...
    def release(self, info: SessionInfo) -> None: ...
    def connected(self, info: SessionInfo, seconds: float) -> None: ...
    def session_ended(self, relay: _relay.Relay) -> None: ...
    def provider_message(self, relay: _relay.Relay, message: bytes) -> None: ...


class ClientHandshake(asyncio.Protocol):
    """Reads the client's upgrade request within the size and time limits, then hands
    the connection to `open_session` and keeps nothing of the request."""

    __slots__ = ("host", "transport", "reader", "timer", "task")

    def __init__(self, host: Host):
        self.host = host
        self.transport = None
        self.task = None

    def connection_made(self, transport):
        self.transport = transport
        self.reader = RequestReader(self.host.limits.max_request_bytes)
        self.timer = asyncio.get_running_loop().call_later(
            self.host.limits.handshake_timeout_seconds, self._timeout)

    def _timeout(self):
        self.host.count("handshake_timeout")
        self.transport.abort()

    def data_received(self, data):
        if self.task is not None:
            return      # the session owns the socket; a client must wait for 101
        try:
            request = self.reader.feed(data)
        except BadRequest as exc:
            self.timer.cancel()
            self.host.count("bad_request")
            self.transport.write(refuse(exc.status, str(exc)).response.serialize())
            self.transport.close()
            return
        if request is None:
            return
        self.timer.cancel()
        self.transport.pause_reading()
        early, self.reader = self.reader.early, None
        self.task = asyncio.get_running_loop().create_task(
            open_session(self.host, self.transport, request, early))

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()


class _UpstreamHandshake(asyncio.Protocol):
    """Sends the upgrade request and parses the response with websockets' parser;
    bytes after the response are kept for the relay."""

    def __init__(self, request: bytes):
        self.request = request
        self.reader = StreamReader()
        self.parser = Response.parse(self.reader.read_line, self.reader.read_exact,
                                     self.reader.read_to_eof)
        next(self.parser)
        self.result = asyncio.get_running_loop().create_future()
        self.size = 0

    def connection_made(self, transport):
        self.transport = transport

    def send_request(self):
        self.transport.write(self.request)

    def _step(self):
        try:
            next(self.parser)
        except StopIteration as done:
            self.transport.pause_reading()
            self._set((done.value, bytes(self.reader.buffer)))
        except Exception as exc:
            self._set(UpstreamError(f"upstream sent an invalid HTTP response ({exc})"))

    def _set(self, value):
        if not self.result.done():
            if isinstance(value, Exception):
                self.result.set_exception(value)
            else:
                self.result.set_result(value)

    def data_received(self, data):
        self.size += len(data)
        self.reader.feed_data(data)
        self._step()
        if not self.result.done() and self.size > _MAX_RESPONSE_BYTES:
            self._set(UpstreamError("upstream response too large"))

    def eof_received(self):
        self.reader.feed_eof()
        self._step()
        return False

    def connection_lost(self, exc):
        self._set(UpstreamError("upstream closed the connection during the handshake"))


async def connect_upstream(host: Host, decision: Accept):
    """TCP, then TLS, then the WebSocket handshake, each named in the error on failure.
    Returns (transport, subprotocol, bytes already read past the 101)."""
    loop = asyncio.get_running_loop()
    upstream = host.router.upstream(decision.route, decision.model)
    uri = upstream.uri
    ws = ClientProtocol(uri, subprotocols=decision.subprotocols)
    request = ws.connect()
    for name, value in upstream.headers:
        request.headers[name] = value
    proto = _UpstreamHandshake(request.serialize())
    stage = "TCP connect"
    transport = None
    try:
        async with asyncio.timeout(host.limits.upstream_connect_timeout_seconds):
            transport, _ = await loop.create_connection(lambda: proto, uri.host, uri.port)
            if upstream.ssl is not None:
                stage = "TLS handshake"
                transport = await loop.start_tls(transport, proto, upstream.ssl,
                                                 server_hostname=uri.host)
                proto.transport = transport
            stage = "WebSocket handshake"
            proto.send_request()
            response, early = await proto.result
    except TimeoutError:
        _drop(transport)
        raise UpstreamError(f"upstream timed out ({stage})") from None
    except ssl.SSLCertVerificationError as exc:
        _drop(transport)
        raise UpstreamError(f"upstream TLS failure: {exc.verify_message}") from None
    except ssl.SSLError as exc:
        _drop(transport)
        raise UpstreamError(f"upstream TLS failure: {exc.reason or exc}") from None
    except ConnectionRefusedError:
        raise UpstreamError("upstream refused the connection") from None
    except OSError as exc:
        _drop(transport)
        if stage == "TLS handshake":
            raise UpstreamError(f"upstream TLS failure: {exc.strerror or exc}") from None
        raise UpstreamError(f"upstream unreachable: {exc.strerror or exc}") from None
    except UpstreamError:
        _drop(transport)
        raise
    try:
        ws.process_response(response)
    except InvalidStatus:
        _drop(transport)
        raise UpstreamError(f"upstream refused: HTTP {response.status_code}") from None
    except InvalidHandshake as exc:
        _drop(transport)
        raise UpstreamError(f"upstream handshake invalid: {exc}") from None
    if ws.extensions:
        _drop(transport)
        raise UpstreamError("upstream negotiated an extension that was not offered")
    return transport, ws.subprotocol, early


def _drop(transport):
    if transport is not None:
        transport.abort()


class _Drain(asyncio.Protocol):
    """After a post-upgrade rejection our close frame is out: what the client still
    sends is scanned by the relay's scanner (which holds at most one frame header)
    and discarded, until its close frame or a violation, then the socket is closed.
    Nothing a rejected client sends is kept, however much it sends, and nothing here
    forms a reference cycle: the connection is freed as soon as it ends."""

    def __init__(self, transport, timeout: float):
        self.transport = transport
        self.scanner = _relay.Scanner(True, record=False)
        self.timer = asyncio.get_running_loop().call_later(timeout, transport.abort)

    def data_received(self, data):
        scanner = self.scanner
        scanner.feed_bytes(data)
        if scanner.verdict_code or scanner.counters()[0][_CLOSE]:
            self.transport.close()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.timer.cancel()


_CLOSE = _relay.KIND_NAMES.index("close")


def _close_after_upgrade(host: Host, transport, decision: Close, early: bytes):
    transport.write(decision.response.serialize())
    transport.write(_relay.close_frame(decision.code, decision.reason, False))
    drain = _Drain(transport, host.limits.close_timeout_seconds)
    transport.set_protocol(drain)
    if early:
        drain.data_received(early)
    if not transport.is_closing():
        transport.resume_reading()


async def open_session(host: Host, transport, request: Request, early: bytes):
    decision = decide(request, host.admission())
    if isinstance(decision, Refuse):
        host.count("bad_request")
        log.info("handshake refused", extra={"event": "refused",
                                             "status": decision.response.status_code,
                                             "reason": decision.reason})
        transport.write(decision.response.serialize())
        transport.close()
        return
    if isinstance(decision, Close):
        host.rejected(decision)
        _close_after_upgrade(host, transport, decision, early)
        return

    info = SessionInfo(decision.key, decision.model, decision.route.name)
    host.reserve(info)
    try:
        started = time.monotonic()
        try:
            upstream, subprotocol, upstream_early = await connect_upstream(host, decision)
        except (UpstreamError, RouteError) as exc:
            code = exc.code if isinstance(exc, RouteError) else 1014
            host.release(info)
            failed = Close(decision.response, code, str(exc), decision.key)
            host.rejected(failed)
            _close_after_upgrade(host, transport, failed, early)
            return
        host.connected(info, time.monotonic() - started)
    except asyncio.CancelledError:     # the client left while we connected
        host.release(info)
        raise
    if transport.is_closing():
        host.release(info)
        upstream.abort()
        return
    # The key file may have changed while the upstream answered.
    _, revoked = host.keyset.recheck(info.key, dt.datetime.now(dt.timezone.utc))
    if revoked is not None:
        host.release(info)
        upstream.abort()
        failed = Close(decision.response, 4001, revoked.value, decision.key, revoked)
        host.rejected(failed)
        _close_after_upgrade(host, transport, failed, early)
        return
    response = decision.response
    # The provider's choice wins. When it picks none, the client's first offer (set
    # by decide) stays: browsers fail a handshake that selects none of their offers.
    if subprotocol is not None:
        if "Sec-WebSocket-Protocol" in response.headers:
            del response.headers["Sec-WebSocket-Protocol"]
        response.headers["Sec-WebSocket-Protocol"] = subprotocol
    transport.write(response.serialize())
    limits = host.limits
    relay = _relay.Relay(asyncio.get_running_loop(), limits.max_message_bytes,
                         limits.close_timeout_seconds, host.session_ended,
                         (MARKER,), host.provider_message)
    relay.session = info
    info.relay = relay
    host.count("accepted")
    relay.start(transport, upstream, early, upstream_early)
    transport.resume_reading()
    upstream.resume_reading()
