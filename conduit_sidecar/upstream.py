"""Opening the provider's WebSocket: one attempt (TCP, TLS, the upgrade), and the
failover over a route's deployments, all before the client is answered.

Candidates are the route's deployments in selection order (weighted random, or
fewest live sessions), then those of the providers a model route lists after it.
A deployment that refuses (HTTP 429, 5xx, 401, 403), fails TCP or TLS, or times out
is skipped for the next, inside one `upstream_connect_timeout_seconds`: each attempt
may use the remaining time divided by the candidates left, so a deployment that
never answers costs its share, not the whole budget, and time one attempt did not
use passes to the next. Other refusals (e.g. HTTP 404) are the request's fault and
end the search. Nothing here runs after the client's 101.

A timeout after the deployment took the TCP connection is counted only when the
attempt had the whole timeout: in a share it may be a healthy deployment slow to
answer, which counted would be rested for being listed beside others.

Each deployment has a circuit breaker (state per sidecar): `failures` attempts in a
row rest it for a cool-down, after which one probe session may try it; a failed
probe doubles the cool-down (capped), a good one closes the circuit. A connect is
judged with what follows it (server.Sidecar.judge, greeting_failed): a session the
provider ends at once (`early_close`) is a failure, one that lives is the success. HTTP 429 with
`Retry-After` rests it for that long; 401 (our credential refused) is a configuration
fault, logged as an error, and rests it at once. A 403 gives no verdict: providers
answer it for what the request asked (a model the project may not use), so counting
it would let any key holder rest a deployment that serves everyone else.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Iterator

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.http11 import Response
from websockets.streams import StreamReader
from websockets.typing import Subprotocol
from websockets.utils import generate_key

from . import _relay, tlsleg
from ._relay import CloseCode
from .config import Circuit, Config
from .handshake import Accept
from .httpread import what
from .metrics import Metrics
from .resolver import Resolver
from .routing import Route, RouteError, Router, Target, Upstream

__all__ = ["Balancer", "Failed", "Health", "UpstreamError", "refusal", "shares"]

log = logging.getLogger("conduit.upstream")
_MAX_RESPONSE_BYTES = 65536
_REASON_BYTES = 123  # a close frame's reason must fit in 125 bytes with the code
_REQUESTS_MAX = 256  # upgrade requests kept (URLs hold client-chosen models)


class UpstreamError(Exception):
    """The upstream could not be opened; the message is the client's close reason."""


class Failed(UpstreamError):
    """One attempt failed. `outcome` is its metric label, `short` its words in a
    multi-attempt close reason; `failover` False when no other deployment would do
    better; `rest` (seconds) when the provider said how long to stay away; `verdict`
    False when it says nothing of the deployment (its circuit does not count it)."""

    def __init__(
        self,
        outcome: str,
        message: str,
        short: str,
        failover: bool = True,
        rest: float | None = None,
        verdict: bool = True,
    ):
        super().__init__(message)
        self.outcome, self.short, self.failover, self.rest = outcome, short, failover, rest
        self.verdict = verdict


# EADDRNOTAVAIL: a connect found no ephemeral port free (the pod's, not the provider's).
_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL))


def exhausted(exc: OSError) -> Failed | None:
    """Outcome `local` when `exc` says this process is out of descriptors, memory or
    local ports: no deployment is at fault (its circuit would rest a healthy provider
    for everyone), none would do better."""
    if exc.errno not in _EXHAUSTED:
        return None
    why = f"sidecar out of resources: {exc.strerror}"
    return Failed("local", why, "local", failover=False, verdict=False)


class _UpstreamHandshake(asyncio.Protocol):
    """Sends the upgrade request and parses the response with websockets' parser;
    bytes after the response are kept for the relay."""

    def __init__(self, request: bytes, at_connect: bool):
        # The request until it is sent, the parser from the response's first bytes: a
        # session opening holds neither while its provider is slow to answer.
        self.request = request
        # A ws leg's is sent by connection_made, in the loop turn the connect
        # completed in, not a turn later when the attempt resumes: a local upstream
        # still awake from taking the connection is not woken again for it (5-8% more
        # new sessions a second in the benchmark, docs/benchmarks.md, "The upgrade
        # request sent in the connect's loop turn"). A wss leg's follows its TLS handshake.
        self.at_connect = at_connect
        self.reader: StreamReader | None = None
        self.result = asyncio.get_running_loop().create_future()
        self.size = 0

    def connection_made(self, transport):
        self.transport = transport
        if self.at_connect:
            self.send_request()

    def send_request(self):
        self.transport.write(self.request)
        self.request = b""

    def _step(self, data: bytes | None) -> None:
        """The response's next bytes to the parser (None: the connection's end)."""
        reader = self.reader
        if reader is None:
            reader = self.reader = StreamReader()
            # Proxy mode: the status line and headers only. A refusal's body is never
            # used, and waiting for it turned a body that is slow, endless or cut short
            # into a timeout or an invalid response: the status, and what it says of the
            # deployment (Retry-After, 401, 404), was lost. (It takes an HTTP/1.0 status
            # line too, which RFC 6455 4.1 does not ask a client to refuse.)
            self.parser = Response.parse(reader.read_line, reader.read_exact, reader.read_to_eof, proxy=True)
            next(self.parser)
        if data is None:
            reader.feed_eof()
        else:
            reader.feed_data(data)
        try:
            next(self.parser)
        except StopIteration as done:
            self.transport.pause_reading()
            self._set((done.value, bytes(reader.buffer)))
        except Exception as exc:
            self._set(
                Failed("invalid", f"upstream sent an invalid HTTP response ({what(exc)})", "bad response")
            )

    def _set(self, value):
        if not self.result.done():
            if isinstance(value, Exception):
                self.result.set_exception(value)
            else:
                self.result.set_result(value)

    def data_received(self, data):
        self.size += len(data)
        self._step(data)
        if not self.result.done() and self.size > _MAX_RESPONSE_BYTES:
            self._set(Failed("invalid", "upstream response too large", "bad response"))

    def eof_received(self):
        self._step(None)
        return False

    def connection_lost(self, exc):
        self._set(Failed("invalid", "upstream closed the connection during the handshake", "closed"))


class _Request:
    """An upstream's upgrade request as websockets' ClientProtocol builds it, kept for
    every session with the same URL, headers and subprotocol offer: a session changes
    only the Sec-WebSocket-Key (a fresh one each time). The same protocol checks each
    response, handed that session's key just before (synchronously: no other session
    runs in between). A protocol per session cost a UUID, a logger lookup, a parser
    generator and two Headers builds, a tenth of a handshake's CPU."""

    __slots__ = ("ws", "head", "tail")

    def __init__(self, upstream: Upstream, subprotocols: tuple[str, ...] | None):
        ws = self.ws = ClientProtocol(
            upstream.uri,
            subprotocols=None if subprotocols is None else [Subprotocol(p) for p in subprotocols],
        )
        ws.parser.close()  # never fed (responses go to Response.parse); no cycle kept
        request = ws.connect()
        for name, value in upstream.headers:
            request.headers[name] = value
        data, key = request.serialize(), ws.key.encode()
        at = data.index(b"\r\nSec-WebSocket-Key: " + key + b"\r\n") + len("\r\nSec-WebSocket-Key: ")
        self.head, self.tail = data[:at], data[at + len(key) :]

    def new(self) -> tuple[str, bytes]:
        """(a fresh key, the request bytes carrying it)"""
        key = generate_key()
        return key, self.head + key.encode() + self.tail

    def check(self, key: str, response: Response) -> Subprotocol | None:
        """websockets' checks of the response to the request with `key`; raises
        InvalidHandshake. Returns the subprotocol the upstream chose."""
        ws = self.ws
        ws.key = key
        ws.process_response(response)
        if ws.extensions:
            raise Failed("invalid", "upstream negotiated an extension that was not offered", "bad handshake")
        return ws.subprotocol


class _Deadline:
    """`async with asyncio.timeout(seconds)` for an attempt, without the context
    manager's two coroutines and state checks (2% of a session's instructions): the
    task is cancelled when the time is up, and `end` turns that cancellation, and no
    other (the client's leaving, the process's stop), into TimeoutError, as the
    context manager's exit does."""

    __slots__ = ("task", "cancelling", "timer", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float):
        task = asyncio.current_task()
        assert task is not None  # a session's opening is a task
        self.task, self.cancelling, self.expired = task, task.cancelling(), False
        self.timer = loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()

    def end(self, exc: BaseException | None) -> None:
        """The timed block is left, by `exc` or (None) at its end."""
        self.timer.cancel()
        if not self.expired:
            return
        # A cancellation requested besides its own (the client left meanwhile) stands.
        if self.task.uncancel() <= self.cancelling and isinstance(exc, asyncio.CancelledError):
            raise TimeoutError from exc


async def _attempt(
    prepared: _Request,
    upstream: Upstream,
    timeout: float,
    cut: bool,
    max_rest: float,
    sessions: tlsleg.SessionCache,
    resolver: Resolver,
):
    """TCP (to the host's addresses in `resolver`), then TLS (resuming the endpoint's
    session in `sessions`, where the relay encrypts the leg), then the WebSocket
    handshake, each named in the error on failure. Returns (transport, subprotocol,
    bytes already read past the 101). `cut`: `timeout` is a share of the connect
    timeout, not the whole."""
    loop = asyncio.get_running_loop()
    uri = upstream.uri
    key, request = prepared.new()
    proto = _UpstreamHandshake(request, upstream.ssl is None)
    del request  # the protocol's, until it is sent
    stage = "TCP connect"
    transport = None
    deadline = _Deadline(loop, timeout)
    try:
        try:
            transport, _ = await resolver.connect(lambda: proto, uri.host, uri.port)
            if upstream.ssl is not None:
                stage = "TLS handshake"
                if _relay.NATIVE_TLS:  # the relay will encrypt this leg itself
                    endpoint = (upstream.ssl, uri.host, uri.port)
                    try:
                        transport = await tlsleg.start_tls(
                            transport, proto, upstream.ssl, uri.host, sessions.get(*endpoint)
                        )
                    except OSError:  # ssl.SSLError included
                        sessions.forget(*endpoint)  # the next handshake starts afresh
                        raise
                else:
                    transport = await loop.start_tls(transport, proto, upstream.ssl, server_hostname=uri.host)
                proto.transport = transport
            stage = "WebSocket handshake"
            if not proto.at_connect:  # (a ws leg's went at connection_made)
                proto.send_request()
            response, early = await proto.result
        except BaseException as exc:
            # Nobody awaits the upgrade's result from here. A TLS handshake that
            # completed in the loop turn that cancelled the attempt (its timeout, the
            # stop) hands the drop's connection_lost to `proto`: its failure, set on
            # the result, was logged as a future exception never retrieved.
            proto.result.cancel()
            deadline.end(exc)
            raise
        deadline.end(None)
    except TimeoutError:
        _drop(transport)
        if stage == "TCP connect":  # the addresses may be dead: the next session waits for a lookup
            resolver.forget(uri.host, uri.port)
        # Once it took the connection, a deployment that had only a share of the time
        # may be healthy and slow (it would have answered within the whole): no verdict.
        verdict = not cut or stage == "TCP connect"
        raise Failed("timeout", f"upstream timed out ({stage})", "timeout", verdict=verdict) from None
    except ssl.SSLCertVerificationError as exc:
        _drop(transport)
        raise Failed("tls", f"upstream TLS failure: {exc.verify_message}", "TLS") from None
    except ssl.SSLError as exc:
        _drop(transport)
        raise Failed("tls", f"upstream TLS failure: {exc.reason or exc}", "TLS") from None
    except ConnectionRefusedError:
        raise Failed("tcp", "upstream refused the connection", "TCP refused") from None
    except OSError as exc:
        _drop(transport)
        if (local := exhausted(exc)) is not None:
            raise local from None
        if stage == "TLS handshake":
            raise Failed("tls", f"upstream TLS failure: {exc.strerror or exc}", "TLS") from None
        raise Failed("tcp", f"upstream unreachable: {exc.strerror or exc}", "TCP") from None
    except (Failed, asyncio.CancelledError):  # cancelled: the client left
        _drop(transport)
        raise
    try:
        subprotocol = prepared.check(key, response)
    except InvalidStatus:
        _drop(transport)
        raise refusal(response.status_code, response.headers.get_all("Retry-After"), max_rest) from None
    except InvalidHandshake as exc:
        _drop(transport)
        raise Failed("invalid", f"upstream handshake invalid: {what(exc)}", "bad handshake") from None
    except Failed:
        _drop(transport)
        raise
    if isinstance(transport, tlsleg.TLSStream):
        sessions.keep(uri.host, uri.port, transport.sslobj)
    return transport, subprotocol, early


def refusal(status: int, retry_after: list[str], max_rest: float) -> Failed:
    """An HTTP refusal (a session's upgrade or a signed-URL fetch) with the values of
    its Retry-After headers."""
    message, short = f"upstream refused: HTTP {status}", f"HTTP {status}"
    if status == 429:
        # One Retry-After or none: a repeated one is ignored.
        return Failed(
            "http_429",
            message,
            short,
            rest=_retry_after(retry_after[0] if len(retry_after) == 1 else None, max_rest),
        )
    if status >= 500:
        return Failed("http_5xx", message, short)
    if 300 <= status < 400:
        # Redirects are not followed (the secret would go where the answer says): the
        # deployment's URL is stale or wrong, which the next deployment may not be.
        return Failed("http_3xx", message, short)
    if status < 300:
        # A success that is no upgrade: the URL is no WebSocket endpoint (a page, a
        # health check, a proxy's own answer), which the next deployment's may be.
        return Failed("http_2xx", message, short)
    if status == 401:
        return Failed("http_auth", message, short)
    if status == 403:
        # Providers answer it for what the request asked (a model the project may not
        # use): another deployment may have it, and no client may rest this one.
        return Failed("http_403", message, short, verdict=False)
    return Failed("http_other", message, short, failover=False)


def _retry_after(value: str | None, cap: float) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), within [0, cap]."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):  # OverflowError: a zone offset past a C int
            return None
    if not math.isfinite(seconds):  # "nan": no clock passes it, the deployment would rest for good
        return None
    return min(max(seconds, 0.0), cap)


def _drop(transport):
    if transport is not None:
        transport.abort()


class Health:
    """One deployment's circuit breaker and live session count (per sidecar).
    Times are `time.monotonic()` seconds, passed in so the rules are testable."""

    __slots__ = ("target", "circuit", "live", "failures", "resting_until", "cooldown", "probing")

    def __init__(self, target: Target, circuit: Circuit):
        self.target = target
        self.circuit = circuit
        self.live = 0  # sessions connecting to or relaying through it
        self.failures = 0  # failed attempts in a row (early closes included)
        self.resting_until: float | None = None  # None: circuit closed (healthy)
        self.cooldown = circuit.cooldown_seconds
        self.probing = False  # the one probe after a rest is under way

    @property
    def name(self) -> str:
        return f"{self.target.provider}/{self.target.label}"

    @property
    def healthy(self) -> bool:
        return self.resting_until is None

    def up(self) -> float:  # the deployment_healthy gauge
        return float(self.healthy)

    def available(self, now: float) -> bool:
        """Closed, or its rest is over and nobody is probing it yet."""
        return self.resting_until is None or (now >= self.resting_until and not self.probing)

    def begin(self) -> bool:
        """An attempt starts; True when it is the one probe after a rest (its verdict,
        and only its, ends the probing)."""
        self.live += 1
        if self.resting_until is not None:
            self.probing = True
            return True
        return False

    def succeeded(self) -> None:
        self.failures = 0
        self.resting_until = None
        self.cooldown = self.circuit.cooldown_seconds
        self.probing = False

    def failed(
        self, now: float, rest: float | None = None, at_once: bool = False, probe: bool = False
    ) -> None:
        """A failed attempt: rest after `failures` in a row (or `at_once`, or for the
        provider's `rest`); a failed probe doubles the cool-down. A probe is no longer
        one once another attempt has succeeded meanwhile: the circuit is closed, and
        its failure is one in a row like any."""
        self.live -= 1
        self.failures += 1
        if probe and self.probing:
            self.probing = False
            self.cooldown = min(self.cooldown * 2, self.circuit.max_cooldown_seconds)
            until = now + (self.cooldown if rest is None else rest)
        # A rest of 0 (Retry-After: 0, a date gone by) says retry now: none.
        elif rest or at_once or self.failures >= self.circuit.failures:
            until = now + (rest or self.cooldown)
        else:
            return
        # Never shorter than a rest under way: an attempt begun before it (a 503 after a
        # 429's Retry-After) says nothing of how long the provider asked us to stay away.
        if self.resting_until is None or until > self.resting_until:
            self.resting_until = until

    def abandoned(self, probe: bool = False) -> None:
        """The attempt ended without a verdict on the deployment (client left, bad request)."""
        self.live -= 1
        if probe:
            self.probing = False

    def release(self) -> None:
        """The session it served has ended."""
        self.live -= 1


def shares(candidates: list[Health], deadline: float, notes: list[str]) -> Iterator[tuple[Health, float]]:
    """Each deployment to try with its share of the time left before `deadline` (loop
    time): the time left divided by the deployments left, so one that never answers
    costs only its share. Those the deadline leaves no time for go into `notes`."""
    loop = asyncio.get_running_loop()
    for i, h in enumerate(candidates):
        left = deadline - loop.time()
        if left <= 0:
            notes.append(f"{h.name} not tried")
            continue
        yield h, left / (len(candidates) - i)


class Balancer:
    """Chooses deployments, fails over between them, and keeps their health."""

    def __init__(self, router: Router, config: Config, metrics: Metrics, rng: random.Random | None = None):
        self.router = router
        self.timeout = config.limits.upstream_connect_timeout_seconds
        self.max_rest = config.circuit.max_cooldown_seconds
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.health: dict[str, list[Health]] = {}
        self.requests: dict[tuple, _Request] = {}
        self.tls_sessions = tlsleg.SessionCache()
        self.resolver = Resolver(
            config.limits.dns_cache_seconds, lambda result: metrics.dns_lookups.inc(result)
        )
        for name in router.configured:
            self.health[name] = [Health(t, config.circuit) for t in router.routes[name].targets]
            for h in self.health[name]:
                metrics.deployment_healthy.labels(name, h.target.label).set_function(h.up)

    def order(self, route: Route, now: float) -> tuple[list[Health], list[Health]]:
        """(deployments to try in order, deployments resting now)."""
        ready: list[Health] = []
        resting: list[Health] = []
        for h in self.health[route.name]:  # one pass: each session asks
            (ready if h.available(now) else resting).append(h)
        if route.selection == "least_sessions":
            return sorted(ready, key=lambda h: h.live), resting  # ties: listed order
        if len(ready) == 1:
            return ready, resting  # nothing to draw
        ordered = []
        while ready:
            pick = self.rng.choices(ready, weights=[h.target.weight for h in ready])[0]
            ready.remove(pick)
            ordered.append(pick)
        return ordered, resting

    async def connect(self, decision: Accept, late: Callable[[], object], session_id: str | None = None):
        """Returns (transport, subprotocol, early bytes, Health of the deployment used,
        whether the attempt was its probe). The attempt's verdict is owed: the caller
        gives it (`succeeded`, or `failed` for an early close) and releases the Health
        when the session ends. Raises UpstreamError (1014) or RouteError (its own code).
        `late` is asked before each attempt after the first (an attempt may take its
        share of the timeout): anything but None (the close of a session whose key was
        revoked meanwhile) stops the failover."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        model = None if decision.modelless else decision.model  # its URL names no model
        # A signed URL's session goes to the deployment that signed it and nowhere else.
        signed = decision.deployment is not None
        fallbacks = [] if signed else self.router.fallbacks(decision.route, model, decision.kept)
        routes = [decision.route] + [r for r in fallbacks if decision.key.allows_provider(r.name)]
        candidates, resting = [], []
        for route in routes:
            ready, rest = self.order(route, time.monotonic())
            candidates += ready
            resting += rest
        if signed:
            candidates = [h for h in candidates if h.target.label == decision.deployment]
            resting = [h for h in resting if h.target.label == decision.deployment]
        errors: list[Exception] = []
        notes: list[str] = []
        for h, share in shares(candidates, deadline, notes):
            if errors and late() is not None:
                raise UpstreamError("session withdrawn")  # the caller answers why
            if not h.available(time.monotonic()):  # another session's failure or probe since
                resting.append(h)
                continue
            probe = h.begin()
            try:
                upstream = self.router.upstream(
                    h.target, model, decision.query, decision.kept, secret=not decision.anonymous
                )
                result = await _attempt(
                    self._request(upstream, decision.subprotocols),
                    upstream,
                    share,
                    len(candidates) > 1,
                    self.max_rest,
                    self.tls_sessions,
                    self.resolver,
                )
            except RouteError as exc:
                h.abandoned(probe)
                if exc.code != CloseCode.INTERNAL_ERROR:  # the request's own fault (a bad model)
                    raise
                self.misconfigured(h, exc, session_id)
                errors.append(exc)
                notes.append(f"{h.name} {exc}")
                continue
            except Failed as exc:
                if decision.anonymous and exc.outcome in ("http_auth", "http_403"):
                    # Refused without the secret (an agent listed as public that is
                    # not): the request's fault, not the deployment's.
                    exc.failover = False
                self.failed(h, exc, probe, session_id)
                errors.append(exc)
                notes.append(f"{h.name} {exc.short}")
                if not exc.failover:
                    break
                continue
            except BaseException:  # the client left (cancelled), or a bug of ours
                h.abandoned(probe)  # no verdict on the deployment; a probe is let go
                raise
            if isinstance(result[0], tlsleg.TLSStream) and result[0].sslobj.session_reused:
                self.metrics.upstream_tls_resumed.inc(h.target.provider, h.target.label)
            return (*result, h, probe)
        notes += [f"{h.name} resting" for h in resting]
        if len(errors) == 1 and not resting and len(notes) == 1:
            raise errors[0]  # one deployment: its own words
        reason = "upstream failed: " + ("; ".join(notes) or "no deployment")
        if len(reason.encode()) > _REASON_BYTES:
            reason = reason.encode()[: _REASON_BYTES - 3].decode(errors="ignore") + "..."
        raise UpstreamError(reason)

    def _request(self, upstream: Upstream, subprotocols: list[str] | None) -> _Request:
        """The upgrade request for this URL, these headers (a rotated secret makes new
        ones) and this offer: built once, then reused."""
        uri = upstream.uri
        offer = None if subprotocols is None else tuple(subprotocols)
        shape = (
            uri.secure,
            uri.host,
            uri.port,
            uri.path,
            uri.query,
            uri.username,
            uri.password,
            tuple(upstream.headers),
            offer,
        )
        request = self.requests.get(shape)
        if request is None:
            if len(self.requests) >= _REQUESTS_MAX:
                del self.requests[next(iter(self.requests))]  # the oldest
            request = self.requests[shape] = _Request(upstream, offer)
        return request

    def succeeded(self, h: Health) -> None:
        """An attempt on `h` succeeded: a session that connected and was not ended at
        once by the provider, or ElevenLabs' signed-URL fetch (signed_urls.py)."""
        h.succeeded()
        self._count(h, "ok")

    def failed(self, h: Health, exc: Failed, probe: bool, session_id: str | None = None) -> None:
        """An attempt on `h` failed: its verdict on the deployment, counted and logged
        (with the session's id; None: a signed-URL fetch)."""
        if not (exc.failover and exc.verdict):  # a refusal of the request says nothing either
            h.abandoned(probe)
        else:
            h.failed(time.monotonic(), exc.rest, at_once=exc.outcome == "http_auth", probe=probe)
        self._count(h, exc.outcome)
        extra = {
            "event": "upstream_attempt",
            "session_id": session_id,
            "provider": h.target.provider,
            "deployment": h.target.label,
            "outcome": exc.outcome,
            "error": str(exc),
            "resting_seconds": round(h.resting_until - time.monotonic(), 3)
            if h.resting_until is not None
            else None,
        }
        if exc.outcome == "http_auth" and exc.failover:
            log.error(
                "upstream refused the provider credentials: a configuration fault; deployment rests",
                extra=extra,
            )
        else:
            log.warning("upstream attempt failed", extra=extra)

    def misconfigured(self, h: Health, exc: RouteError, session_id: str | None = None) -> None:
        """The deployment's own configuration fault (its secret or CA file missing)."""
        log.error(
            f"{exc}: a configuration fault",  # fixed texts: no secret in them
            extra={
                "event": "upstream_attempt",
                "session_id": session_id,
                "provider": h.target.provider,
                "deployment": h.target.label,
                "outcome": "config",
                "error": exc.detail,
            },
        )
        self._count(h, "config")

    def _count(self, h: Health, outcome: str) -> None:
        self.metrics.upstream_attempts.inc(h.target.provider, h.target.label, outcome)
