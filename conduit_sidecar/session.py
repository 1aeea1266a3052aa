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
from typing import TYPE_CHECKING

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus, SecurityError
from websockets.http11 import Request, Response
from websockets.streams import StreamReader

from . import _relay
from .handshake import Accept, Close, Refuse, decide, refuse
from .keys import KeyEntry
from .metering import MARKER, Usage
from .routing import RouteError

if TYPE_CHECKING:
    from .server import Sidecar

__all__ = ["ClientHandshake", "SessionInfo", "UpstreamError", "connect_upstream"]

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


class ClientHandshake(asyncio.Protocol):
    """Reads the client's upgrade request within the size and time limits."""

    def __init__(self, sidecar: Sidecar):
        self.sidecar = sidecar
        self.transport = None
        self.task = None
        self.size = 0

    def connection_made(self, transport):
        self.transport = transport
        self.reader = StreamReader()
        self.parser = Request.parse(self.reader.read_line)
        next(self.parser)
        self.timer = asyncio.get_running_loop().call_later(
            self.sidecar.config.limits.handshake_timeout_seconds, self._timeout)

    def _timeout(self):
        self.sidecar.count("handshake_timeout")
        self.transport.abort()

    def data_received(self, data):
        if self.task is not None:
            return      # the session owns the socket; a client must wait for 101
        self.size += len(data)
        self.reader.feed_data(data)
        try:
            next(self.parser)
        except StopIteration as done:
            early = bytes(self.reader.buffer)
            if self.size - len(early) > self.sidecar.config.limits.max_request_bytes:
                self._refuse(refuse(431, "request headers too large"))
                return
            self.timer.cancel()
            self.transport.pause_reading()
            self.task = asyncio.get_running_loop().create_task(
                open_session(self.sidecar, self.transport, done.value, early))
            return
        except SecurityError as exc:
            self._refuse(refuse(431, f"request too large: {_what(exc)}"))
            return
        except (ValueError, NotImplementedError, UnicodeDecodeError, EOFError) as exc:
            # EOFError: a line without CRLF (websockets' parser says "connection closed")
            self._refuse(refuse(400, f"bad request: {_what(exc)}"))
            return
        if self.size > self.sidecar.config.limits.max_request_bytes:
            self._refuse(refuse(431, "request headers too large"))

    def _refuse(self, decision: Refuse):
        self.timer.cancel()
        self.sidecar.count("bad_request")
        self.transport.write(decision.response.serialize())
        self.transport.close()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()


def _what(exc: Exception) -> str:
    """websockets' parser error without the offending line, which may hold a key
    ("invalid HTTP header line: Authorization: ...")."""
    return str(exc).split(":", 1)[0]


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


async def connect_upstream(sidecar: Sidecar, decision: Accept):
    """TCP, then TLS, then the WebSocket handshake, each named in the error on failure.
    Returns (transport, subprotocol, bytes already read past the 101)."""
    loop = asyncio.get_running_loop()
    upstream = sidecar.router.upstream(decision.route, decision.model)
    uri = upstream.uri
    ws = ClientProtocol(uri, subprotocols=decision.subprotocols)
    request = ws.connect()
    for name, value in upstream.headers:
        request.headers[name] = value
    proto = _UpstreamHandshake(request.serialize())
    stage = "TCP connect"
    transport = None
    try:
        async with asyncio.timeout(sidecar.config.limits.upstream_connect_timeout_seconds):
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


def _close_after_upgrade(sidecar: Sidecar, transport, decision: Close, early: bytes):
    transport.write(decision.response.serialize())
    transport.write(_relay.close_frame(decision.code, decision.reason, False))
    drain = _Drain(transport, sidecar.config.limits.close_timeout_seconds)
    transport.set_protocol(drain)
    if early:
        drain.data_received(early)
    if not transport.is_closing():
        transport.resume_reading()


async def open_session(sidecar: Sidecar, transport, request: Request, early: bytes):
    decision = decide(request, keyset=sidecar.keyset, router=sidecar.router,
                      now=dt.datetime.now(dt.timezone.utc), live_per_key=sidecar.live_per_key,
                      at_capacity=sidecar.at_capacity(), draining=sidecar.draining,
                      allowed_origins=sidecar.config.allowed_origins)
    if isinstance(decision, Refuse):
        sidecar.count("bad_request")
        log.info("handshake refused", extra={"event": "refused",
                                             "status": decision.response.status_code,
                                             "reason": decision.reason})
        transport.write(decision.response.serialize())
        transport.close()
        return
    if isinstance(decision, Close):
        sidecar.rejected(decision)
        _close_after_upgrade(sidecar, transport, decision, early)
        return

    info = SessionInfo(decision.key, decision.model, decision.route.name)
    sidecar.reserve(info)
    try:
        started = time.monotonic()
        try:
            upstream, subprotocol, upstream_early = await connect_upstream(sidecar, decision)
        except (UpstreamError, RouteError) as exc:
            code = exc.code if isinstance(exc, RouteError) else 1014
            sidecar.release(info)
            failed = Close(decision.response, code, str(exc), decision.key)
            sidecar.rejected(failed)
            _close_after_upgrade(sidecar, transport, failed, early)
            return
        sidecar.metrics.upstream_connect.labels(info.provider).observe(time.monotonic() - started)
    except asyncio.CancelledError:     # the client left while we connected
        sidecar.release(info)
        raise
    if transport.is_closing():
        sidecar.release(info)
        upstream.abort()
        return
    # The key file may have changed while the upstream answered.
    _, revoked = sidecar.keyset.recheck(info.key, dt.datetime.now(dt.timezone.utc))
    if revoked is not None:
        sidecar.release(info)
        upstream.abort()
        failed = Close(decision.response, 4001, revoked, decision.key)
        sidecar.rejected(failed)
        _close_after_upgrade(sidecar, transport, failed, early)
        return
    response = decision.response
    # The provider's choice wins. When it picks none, the client's first offer (set
    # by decide) stays: browsers fail a handshake that selects none of their offers.
    if subprotocol is not None:
        if "Sec-WebSocket-Protocol" in response.headers:
            del response.headers["Sec-WebSocket-Protocol"]
        response.headers["Sec-WebSocket-Protocol"] = subprotocol
    transport.write(response.serialize())
    limits = sidecar.config.limits
    relay = _relay.Relay(asyncio.get_running_loop(), limits.max_message_bytes,
                         limits.close_timeout_seconds, sidecar.session_ended,
                         MARKER, sidecar.provider_message)
    relay.session = info
    info.relay = relay
    sidecar.count("accepted")
    relay.start(transport, upstream, early, upstream_early)
    transport.resume_reading()
    upstream.resume_reading()
