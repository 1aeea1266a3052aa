"""The pod-injection admission webhook: `conduit-sidecar inject-webhook`.

An HTTPS server for the Kubernetes API server. `POST /mutate` takes an
AdmissionReview (admission.k8s.io/v1) for a pod CREATE and answers with the JSON
Patch from `inject.json_patch_for_pod`; `GET /healthz` answers `ok`.

Answers: a pod that cannot be injected (bad annotation, malformed pod) is refused
with `allowed: false` and the reason; a review without a `request.uid` or a body that
is not JSON gets HTTP 400, a body without Content-Length 411, over 2 MiB 413, a
malformed request 400, a request head still incomplete after 16 KiB (a read is 64 KiB
at most) 431. Nothing a client sends makes it answer 500 or stop.

It runs on the same asyncio (uvloop) stack as the sidecar: one task per connection,
no threads. What a client can hold is bounded (the pod has a 128Mi memory limit, and
with `failurePolicy: Fail` an injector down blocks every opted-in pod):

* connections: `MAX_CONNECTIONS`, counted from accept: past it a new connection
  takes the place of the oldest one idle between requests, or is closed at once,
  before its TLS handshake, so pending handshakes are bounded too (TLS runs in
  `tlsleg.TLSStream`, as on the sidecar's wss listener);
* time: the TLS handshake with the first request, then each further request (from
  its first bytes until its answer is written), must each be over within
  `REQUEST_DEADLINE`, however the bytes arrive; a connection waits for its next
  request up to `IDLE_TIMEOUT`; else the connection is dropped;
* memory: a body is read up to `MAX_BODY`, and the bodies in progress together up to
  `BODY_BUDGET`: past it, the connection holding the most is dropped, so a trickling
  attacker loses and a small review goes through. A body goes into an anonymous
  mapping, returned to the system when its request ends; the Deployment sets
  `MALLOC_MMAP_THRESHOLD_=65536` so that TLS and parser buffers are too (else glibc
  keeps the heap an attack fragmented: +25 MiB after 80 trickled bodies, not +5),
  and `PYTHONMALLOC=malloc`, so that the objects a large body decodes into are in
  glibc's heap, which a request of `_TRIM_AFTER` or more trims as it ends (pymalloc's
  1 MiB arenas stay while one object in them lives: +10 to +16 MiB kept after a
  burst of large refused reviews).

HTTP/1.1 parsing is h11's (sans-I/O; websockets' parser refuses request bodies).
The TLS certificate and key are re-read when their files change (cert-manager
renews them in place), checked at each new connection.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import math
import mmap
import os
import signal
import sys
import time
from http import HTTPStatus

import h11
import msgspec
import uvloop

from .. import _relay, logs
from ..config import TLS_PORT, ConfigError, split_hostport
from ..tls import CertFiles
from ..tlsleg import TLSStream
from .inject import DEFAULT_IMAGE, InjectError, Settings, injection_warnings, json_patch_for_pod

__all__ = [
    "BODY_BUDGET",
    "IDLE_TIMEOUT",
    "MAX_BODY",
    "MAX_CONNECTIONS",
    "REQUEST_DEADLINE",
    "Webhook",
    "add_arguments",
    "review_response",
    "run",
]

log = logging.getLogger("conduit.webhook")

MAX_BODY = 2 << 20  # a pod is at most 1.5 MiB (etcd's limit), plus the review around it
MAX_HEADERS = 16 << 10  # request line and headers
MAX_CONNECTIONS = 128
BODY_BUDGET = 16 << 20  # all bodies in progress; with the rest, well under 128Mi
REQUEST_DEADLINE = 10.0  # seconds; the API server gives up after timeoutSeconds (5)
# Longer than the API server keeps an idle connection (Go's http.Transport
# IdleConnTimeout, 90 s): it is the client that ends an idle connection, never the
# webhook just as a review is sent on it (with failurePolicy Fail, the pod refused).
IDLE_TIMEOUT = 120.0
# A body from this size up (a pod review is a few KiB) is followed by a malloc_trim.
_TRIM_AFTER = 256 << 10
# What an answer or a log line quotes of a pod: the API server's validation, which
# limits names (253 characters) and annotations (256 KiB), runs after admission.
_MAX_QUOTED = 1000


class BadReview(ValueError):
    """A request too malformed to answer with an AdmissionReview (HTTP 400)."""


def review_response(review, defaults: Settings = Settings()) -> dict:
    """The AdmissionReview answering `review` (already decoded from JSON).

    Raises BadReview when there is no `request.uid` to answer to.
    """
    request = review.get("request") if isinstance(review, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    if not isinstance(uid, str) or not uid:
        raise BadReview("not an AdmissionReview: request.uid is missing")
    assert isinstance(request, dict)  # uid was read from it
    response: dict = {"uid": uid, "allowed": True}
    if review.get("apiVersion") != "admission.k8s.io/v1" or review.get("kind") != "AdmissionReview":
        _deny(response, "expected apiVersion admission.k8s.io/v1, kind AdmissionReview")
    elif _kind(request) != "Pod" or request.get("operation") != "CREATE":
        pass  # not ours to change: the webhook rules send only pod CREATEs
    else:
        pod = request.get("object")
        where = f"{request.get('namespace') or '-'}/{_pod_name(pod)}"
        try:
            if not isinstance(pod, dict):
                raise InjectError("request.object is not a pod")
            patch = json_patch_for_pod(pod, defaults)
            warnings = injection_warnings(pod, defaults)
        except InjectError as exc:
            reason = str(exc)[:_MAX_QUOTED]  # it may quote an annotation of any size
            _deny(response, f"conduit-sidecar injection: {reason}")
            log.info("denied", extra={"event": "deny", "pod": where, "reason": reason})
        except Exception:
            # A bug of ours: refuse this pod with a reason rather than fail the request.
            log.exception("injection failed", extra={"event": "error", "pod": where})
            _deny(response, "conduit-sidecar injection: internal error (see the webhook's log)")
        else:
            if patch:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
            if warnings:  # shown to the pod's creator (kubectl prints "Warning: ...")
                response["warnings"] = warnings
            log.info(
                "injected" if patch else "already injected",
                extra={"event": "admit", "pod": where, "operations": len(patch), "warnings": warnings},
            )
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def _deny(response: dict, message: str) -> None:
    response["allowed"] = False
    response["status"] = {"code": 400, "reason": "BadRequest", "message": message}


def _kind(request: dict):
    kind = request.get("kind")
    return kind.get("kind") if isinstance(kind, dict) else None


def _pod_name(pod) -> str:
    metadata = pod.get("metadata") if isinstance(pod, dict) else None
    if not isinstance(metadata, dict):
        return "-"
    name = str(metadata.get("name") or f"{metadata.get('generateName') or '-'}*")  # any JSON type
    return name[:_MAX_QUOTED]


class _Bodies:
    """Bytes buffered by the request bodies in progress, across connections."""

    def __init__(self, budget: int):
        self.budget = budget
        self.held: dict[_Connection, int] = {}
        self.total = 0

    def add(self, conn: _Connection, n: int) -> None:
        """Count n more bytes for conn's request. Over the budget, drop the
        connection holding the most (perhaps conn itself)."""
        self.held[conn] = self.held.get(conn, 0) + n
        self.total += n
        while self.total > self.budget:
            hog = max(self.held, key=self.held.__getitem__)
            log.info(
                "request body dropped: bodies in progress over budget",
                extra={"event": "shed", "bytes": self.held[hog], "budget": self.budget},
            )
            self.release(hog)
            hog.drop()

    def release(self, conn: _Connection) -> None:
        self.total -= self.held.pop(conn, 0)


class _Dropped(Exception):
    """The connection was dropped under us, or the peer went away."""


class _Connection(asyncio.Protocol):
    """One client's HTTP/1.1 requests through h11, read one decrypted piece (64 KiB
    at most) at a time: reading is paused unless h11 needs more, and the TLS stream
    keeps the rest undecrypted. Each request is answered within the deadline."""

    def __init__(self, webhook: Webhook):
        self.webhook = webhook
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        self.waiter: asyncio.Future | None = None  # set when h11 has data for us
        self.writable: asyncio.Future | None = None  # set when the client reads again
        self.closed = False
        self.task: asyncio.Task | None = None

    transport: asyncio.Transport  # the TLS stream, from connection_made until _release

    def connection_made(self, transport) -> None:
        # At accept, before the TLS handshake (TLSStream tells its app at once).
        webhook = self.webhook
        if webhook.connections >= webhook.max_connections:
            if not webhook.idle:
                webhook.refused()
                self.closed = True
                transport.abort()
                return
            # Idle keep-alive connections (the API servers keep some for 90 s) must not
            # keep a new one out. The one dropped leaves the count on the loop's next turn.
            oldest = next(iter(webhook.idle))
            del webhook.idle[oldest]
            oldest.drop()
        webhook.connections += 1
        self.transport = transport
        self.task = asyncio.get_running_loop().create_task(self.serve())

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.transport.pause_reading()
        self.http.receive_data(data)
        self._wake()

    def eof_received(self) -> bool:
        self._lost()
        return False

    def connection_lost(self, exc) -> None:
        self._lost()

    def _lost(self) -> None:
        if not self.closed:
            self.closed = True
            self.http.receive_data(b"")
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def drop(self) -> None:
        self._lost()
        self.transport.abort()

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    async def serve(self) -> None:
        webhook = self.webhook
        peer = (self.transport.get_extra_info("peername") or ("-",))[0]
        try:
            while True:
                async with asyncio.timeout(REQUEST_DEADLINE):
                    if not await self.exchange():
                        break
                    if self.writable is not None:
                        await self.writable  # a client that does not read gets no more
                self.http.start_next_cycle()
                async with asyncio.timeout(IDLE_TIMEOUT):
                    await self.idle()
            self.transport.close()  # after what is written, with a TLS close_notify
        except (TimeoutError, OSError, _Dropped) as exc:
            log.debug("connection dropped", extra={"peer": peer, "error": repr(exc)})
        except Exception:
            log.warning("connection error", exc_info=True, extra={"peer": peer})
        finally:
            webhook.connections -= 1
            webhook.bodies.release(self)
            self._release()

    def _release(self) -> None:
        if not self.transport.is_closing():
            self.drop()
        # The TLS stream refers to us until its connection ends; without our reference
        # back there is no cycle, and its buffers are freed now, not at some cyclic GC.
        self.closed = True
        del self.transport, self.http
        self.waiter = self.writable = None

    async def idle(self) -> None:
        """Wait, reading, for the next request's first bytes or the connection's end."""
        idle = self.webhook.idle
        idle[self] = None
        try:
            while self.http.trailing_data == (b"", False) and not self.transport.is_closing():
                self.waiter = asyncio.get_running_loop().create_future()
                self.transport.resume_reading()
                await self.waiter
        finally:
            idle.pop(self, None)

    async def next_event(self):
        """h11's next event, reading while it needs data."""
        while (event := self.http.next_event()) is h11.NEED_DATA:
            if self.transport.is_closing():
                raise _Dropped()
            self.waiter = asyncio.get_running_loop().create_future()
            self.transport.resume_reading()
            await self.waiter
        return event

    async def exchange(self) -> bool:
        """Read one request, answer it; True if the connection may carry another."""
        http = self.http
        request = None
        try:
            request = await self.next_event()
            if not isinstance(request, h11.Request):
                return False  # closed between requests
            status, body, content_type = await self.answer(request)
        except h11.RemoteProtocolError as exc:
            if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or self.transport.is_closing():
                return False  # an answer is under way, or no one to send one to
            status, body, content_type = exc.error_status_hint, f"{exc}\n".encode(), "text/plain"
        finally:
            self.webhook.bodies.release(self)
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if http.their_state is not h11.DONE:
            headers.append(("Connection", "close"))  # the request is left unread
        response = http.send(
            h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode())
        )
        if request is None or request.method != b"HEAD":  # a HEAD answer has no body
            response += http.send(h11.Data(data=body))
        self.transport.write(response + http.send(h11.EndOfMessage()))
        return http.our_state is h11.DONE and http.their_state is h11.DONE

    async def answer(self, request: h11.Request) -> tuple[int, bytes, str]:
        headers = dict(request.headers)
        if b"transfer-encoding" in headers:
            return 411, b"Content-Length required\n", "text/plain"
        length = int(headers.get(b"content-length", 0))
        if length > MAX_BODY:
            return 413, f"request body over {MAX_BODY >> 20} MiB\n".encode(), "text/plain"
        if self.http.they_are_waiting_for_100_continue:
            self.transport.write(self.http.send(h11.InformationalResponse(status_code=100, headers=[])))
        # Read the body whatever the path: answering with unread input may reset the
        # connection, and the client could lose the answer. It goes into a mapping of
        # its announced length: pages become resident only as bytes arrive, and all
        # go back to the system when the request ends (heap pieces would fragment).
        mapped = mmap.mmap(-1, length) if length else None
        body = mapped if mapped is not None else bytearray()
        try:
            offset = 0
            while not isinstance(event := await self.next_event(), h11.EndOfMessage):
                body[offset : offset + len(event.data)] = event.data
                offset += len(event.data)
                self.webhook.bodies.add(self, len(event.data))
            if self.transport.is_closing():
                raise _Dropped()  # over the body budget
            path = request.target.split(b"?", 1)[0]
            if path == b"/healthz" and request.method in (b"GET", b"HEAD"):
                return 200, b"ok\n", "text/plain"
            if path != b"/mutate" or request.method != b"POST":
                return 404, b"not found\n", "text/plain"
            try:
                answer = review_response(msgspec.json.decode(body), self.webhook.defaults)
            except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # BadReview is a ValueError
                log.info("bad review", extra={"event": "bad_request", "error": str(exc)[:200]})
                return 400, f"{exc}\n".encode(), "text/plain"
            return 200, json.dumps(answer).encode(), "application/json"
        finally:
            if mapped is not None:
                mapped.close()
            if length >= _TRIM_AFTER:
                # Its decoded objects are freed by now: give their pages back (glibc
                # keeps them, in the middle of the heap too, for reuse).
                _relay.malloc_trim()


class Webhook:
    """The HTTPS server; `await start(host, port)`, then `close()`."""

    def __init__(
        self, certs: CertFiles, defaults: Settings = Settings(), max_connections: int = MAX_CONNECTIONS
    ):
        self.certs, self.defaults, self.max_connections = certs, defaults, max_connections
        self.bodies = _Bodies(BODY_BUDGET)
        self.connections = 0
        self.idle: dict[_Connection, None] = {}  # waiting for their next request, oldest first
        self.refusals = 0  # connections refused since the last line that said so
        self.refusals_logged = -1.0  # when that line was written (monotonic)
        self.telling: asyncio.TimerHandle | None = None  # the line of `refusals`, owed
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.get_running_loop().create_server(self._accept, host, port)
        return self.server.sockets[0].getsockname()[:2]

    def _accept(self) -> TLSStream:
        # Before the TLS handshake: a renewed certificate is in place for it.
        self.certs.check()
        return TLSStream(self.certs.context, _Connection(self), server_side=True)

    def refused(self) -> None:
        """A connection past max_connections. A flood of them is not a flood of log
        lines: at most one a second, with how many; those past it are told when the
        second is over (or at the close), not only when a later refusal comes."""
        self.refusals += 1
        if self.telling is None:
            wait = self.refusals_logged + 1.0 - time.monotonic()
            if wait <= 0:
                self._tell()
            else:
                self.telling = asyncio.get_running_loop().call_later(wait, self._tell)

    def _tell(self) -> None:
        self.telling = None
        log.info(
            "connections refused: too many",
            extra={"event": "shed", "refused": self.refusals, "connections": self.connections},
        )
        self.refusals, self.refusals_logged = 0, time.monotonic()

    async def close(self) -> None:
        assert self.server is not None  # start() made it
        self.server.close()
        if self.telling is not None:  # refusals not told yet
            self.telling.cancel()
            self._tell()
        await self.server.wait_closed()


def _at_least(low: float, kind: type[int] | type[float]):
    """An argparse type: a finite number of `kind`, at least `low` (a delay of nan was
    a traceback at SIGTERM and no stop; 0 connections, no review ever served)."""

    def parse(text: str):
        with contextlib.suppress(ValueError):
            if low <= kind(text) < math.inf:  # (nan compares false)
                return kind(text)
        raise argparse.ArgumentTypeError(f"must be a number of at least {low}, got {text!r}")

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", required=True, metavar="FILE", help="PEM certificate (chain)")
    p.add_argument("--tls-key", required=True, metavar="FILE", help="PEM private key")
    p.add_argument(
        "--listen",
        default=f"*:{TLS_PORT}",
        metavar="HOST:PORT",
        help="host * (the default): every IPv4 and IPv6 address",
    )
    p.add_argument(
        "--sidecar-image",
        default=os.environ.get("CONDUIT_SIDECAR_IMAGE", DEFAULT_IMAGE),
        metavar="IMAGE",
        help="image of the injected sidecar (default: $CONDUIT_SIDECAR_IMAGE or %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=_at_least(1, int),
        default=MAX_CONNECTIONS,
        metavar="N",
        help="connections served at once; more are closed (default: %(default)s)",
    )
    p.add_argument(
        "--shutdown-delay",
        type=_at_least(0, float),
        default=5.0,
        metavar="SECONDS",
        help="after SIGTERM, go on answering this long: the API server sends reviews until its "
        "endpoints drop the pod (default: %(default)s; SIGINT or a second SIGTERM: at once)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT."""
    logs.setup(args.log_level)
    try:
        host, port = split_hostport(args.listen)
        certs = CertFiles(args.tls_cert, args.tls_key)  # fail at start on a bad cert or key
    except (ValueError, ConfigError) as exc:
        print(f"conduit-sidecar inject-webhook: {exc}", file=sys.stderr)
        return 1
    webhook = Webhook(certs, Settings(image=args.sidecar_image), args.max_connections)
    try:
        return uvloop.run(_serve(webhook, host, port, args.sidecar_image, args.shutdown_delay))
    except OSError as exc:
        print(f"conduit-sidecar inject-webhook: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1


async def _serve(webhook: Webhook, host: str, port: int, image: str, delay: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    later: list[asyncio.TimerHandle] = []

    def terminate() -> None:
        if later:  # a second SIGTERM
            stop.set()
            return
        log.info("stopping", extra={"event": "stopping", "seconds": delay})
        later.append(loop.call_later(delay, stop.set))

    loop.add_signal_handler(signal.SIGTERM, terminate)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    host, port = await webhook.start(host, port)
    await stop.wait()
    await webhook.close()
    return 0
