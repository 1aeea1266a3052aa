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
import time
from typing import Protocol

from websockets.http11 import Request

from . import _relay
from .config import Limits
from .handshake import Admission, Close, Refuse, decide, refuse
from .httpread import BadRequest, RequestReader
from .keys import KeyEntry, KeySet
from .metering import MARKER, Usage
from .routing import RouteError, Router
from .upstream import Balancer, UpstreamError

__all__ = ["ClientHandshake", "Host", "SessionInfo"]

log = logging.getLogger("conduit.session")
_ids = itertools.count(1)


class SessionInfo:
    __slots__ = ("id", "key", "key_id", "model", "provider", "started", "relay", "usage",
                 "seen_activity", "active_at", "upstream")

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
        self.upstream = None            # the deployment's Health; released at the end


class Host(Protocol):
    """What a session needs from the process that serves it (server.Sidecar is one).
    Sessions know nothing else of it: data flows from the listener to the relay, and
    events (admission, release, the end) flow back only through these members."""

    limits: Limits
    router: Router
    keyset: KeySet
    balancer: Balancer

    def admission(self) -> Admission: ...
    async def govern(self, info: SessionInfo) -> tuple[int, str] | None: ...
    def started(self, info: SessionInfo) -> None: ...
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
        refusal = await host.govern(info)
        if refusal is not None:
            host.release(info)
            refused = Close(decision.response, *refusal, decision.key)
            host.rejected(refused)
            _close_after_upgrade(host, transport, refused, early)
            return
        started = time.monotonic()
        try:
            upstream, subprotocol, upstream_early, info.upstream = \
                await host.balancer.connect(decision)
            info.provider = info.upstream.target.provider     # after a failover: the next one
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
    host.started(info)
    transport.resume_reading()
    upstream.resume_reading()
