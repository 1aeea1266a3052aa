"""ElevenLabs' REST call in front of a private agent's session.

Its SDK first calls `GET /v1/convai/conversation/get-signed-url?agent_id=...` with the
API key in `xi-api-key`, then dials the URL it gets back, which carries no key. The
sidecar checks the virtual key, fetches a signed URL from the provider with the real
secret (verified TLS, bounded in time and size), and hands back the same URL pointed
at itself. It remembers which key each signature was issued to, briefly and boundedly,
so the session that follows is checked, counted and governed as that key's.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime as dt
import http
import http.client
import os
import queue
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Protocol

import msgspec
from websockets.datastructures import Headers
from websockets.headers import build_host
from websockets.http11 import Request, Response

from ._relay import CloseCode
from .config import Limits
from .handshake import admit, key_misplaced, refuse
from .keys import KeySet, Rejection
from .resolver import Resolver
from .routing import Route, RouteError, Router, Upstream
from .upstream import Balancer, Failed, exhausted, refusal, shares

__all__ = ["PATH", "SignedUrls", "answer"]

PATH = "/v1/convai/conversation/get-signed-url"
# What ElevenLabs' SDKs may ask with agent_id (which environment, branch or version of
# the agent; the conversation id in the signed URL): the client's choice, passed once
# each. Nothing else goes to the provider.
_PASSED = ("include_conversation_id", "branch_id", "version_id", "environment", "debug_events_request")
_MAX_RESPONSE_BYTES = 65536
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d+)?$|^\[[0-9A-Fa-f:.]+\](:\d+)?$")
_STATUS: dict[int, int] = {
    CloseCode.AUTH_FAILED: 401,
    CloseCode.FORBIDDEN: 403,
    CloseCode.NO_ROUTE: 404,
    CloseCode.INTERNAL_ERROR: 500,
}


class SignedUrls:
    """Signatures handed out -> (the hash of the key they stand for, the deployment that
    signed them: only it takes the signature). The hash, not the key's id: a rotation
    under the same id ends what the old key signed, as it ends its sessions. Least
    recently issued go first past `size`; a signature is good for `ttl` seconds
    (ElevenLabs': 15 min)."""

    def __init__(self, size: int = 10000, ttl: float = 900.0, clock=time.monotonic):
        self.size, self.ttl, self.clock = size, ttl, clock
        self.issued: collections.OrderedDict[str, tuple[str, str, float]] = collections.OrderedDict()

    def remember(self, signature: str, key_hash: str, deployment: str) -> None:
        self.issued[signature] = (key_hash, deployment, self.clock() + self.ttl)
        self.issued.move_to_end(signature)
        while len(self.issued) > self.size:
            self.issued.popitem(last=False)

    def issued_to(self, signature: str) -> tuple[str, str] | None:
        """(key hash, deployment label), or None: unknown or expired."""
        entry = self.issued.get(signature)
        if entry is None:
            return None
        if entry[2] < self.clock():
            del self.issued[signature]
            return None
        return entry[0], entry[1]


class _Signed(msgspec.Struct):
    signed_url: str


_decoder = msgspec.json.Decoder(_Signed)
_Split = urllib.parse.SplitResult


def _json(status: int, body: dict) -> Response:
    data = msgspec.json.encode(body)
    headers = Headers(
        [("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Connection", "close")]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, data)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None  # the secret goes to the configured host only: a 3xx is an error


class _Fetchers(concurrent.futures.Executor):
    """The default executor's pool (as many threads), of daemon threads: those are
    joined at exit, and a fetch blocked on a provider that never answers ends only at
    its socket timeout, so a second signal's stop waited for it. A call cancelled
    while queued is skipped."""

    def __init__(self, workers: int = min(32, (os.cpu_count() or 1) + 4)):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.workers = workers

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.calls.put((future, fn, args, kwargs))
        if self.workers:
            self.workers -= 1
            threading.Thread(target=self._work, name="signed-url", daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            future, fn, args, kwargs = self.calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # the caller's to judge
                    future.set_exception(exc)
            del future, fn, args, kwargs  # not kept while the next call is awaited


_FETCHERS = _Fetchers()


class _Dialed(http.client.HTTPConnection):
    """Connects to `addresses` (the resolver's for its host, as a session's leg does),
    the next on a failure; no lookup of its own. (TLS, below, still checks the host
    name and sends it as SNI.)"""

    addresses: list[tuple[str, int]] = []

    def connect(self):
        error: OSError | None = None
        for address in self.addresses:
            try:
                self.sock = socket.create_connection(address, self.timeout)
                return
            except OSError as exc:
                error = exc
        assert error is not None  # the resolver gives at least one address
        raise error


class _DialedTLS(http.client.HTTPSConnection, _Dialed):  # its connect wraps _Dialed's socket
    pass


class _Handler(urllib.request.HTTPSHandler, urllib.request.HTTPHandler):
    def __init__(self, context: ssl.SSLContext | None, addresses: list[tuple[str, int]]):
        super().__init__(context=context)
        self.tls, self.addresses = context, addresses

    def _connection(self, cls: type[_Dialed]):
        def make(host, **kwargs) -> _Dialed:
            connection = cls(host, **kwargs)
            connection.addresses = self.addresses
            return connection

        return make

    def http_open(self, req):
        return self.do_open(self._connection(_Dialed), req)

    def https_open(self, req):
        return self.do_open(self._connection(_DialedTLS), req, context=self.tls)


def _fetch(
    url: str, headers: list[tuple[str, str]], context, addresses: list[tuple[str, int]], timeout: float
) -> bytes:
    request = urllib.request.Request(url, headers=dict(headers))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), _NoRedirect(), _Handler(context, addresses)
    )
    with opener.open(request, timeout=timeout) as response:
        return response.read(_MAX_RESPONSE_BYTES + 1)


class Gate(Protocol):
    """What answering a signed-URL request needs from the process (session.Host has it)."""

    keyset: KeySet
    router: Router
    limits: Limits
    signed_urls: SignedUrls
    balancer: Balancer
    draining: bool

    def auth_failed(self, why: Rejection) -> None: ...


async def answer(host: Gate, request: Request, secure: bool) -> Response:
    """The response to a get-signed-url request."""
    if request.method != "GET":  # HEAD, DELETE...: not this call's, whose answer is a body
        refused = refuse(405, "the signed-URL call is a GET").response
        refused.headers["Allow"] = "GET"
        return refused
    if host.draining:  # the URL would be refused (1013): its session could not start here
        return _json(503, {"detail": "sidecar is draining: try again later"})
    url = urllib.parse.urlsplit(request.path)
    query = urllib.parse.parse_qs(url.query)
    if key_misplaced(query, ()):  # the key goes in xi-api-key; these go to the provider
        return refuse(400, "a virtual key in a query parameter").response
    agents = query.get("agent_id", [])
    if len(agents) != 1 or not agents[0]:
        return refuse(400, "agent_id is required, once").response
    agent = agents[0]
    passed = [(name, query[name][0]) for name in _PASSED if len(query.get(name, ())) == 1]
    hosts = request.headers.get_all("Host")  # two: Headers.get raises, not a KeyError
    authority = hosts[0] if len(hosts) == 1 else ""
    if not _HOST.match(authority):
        return refuse(400, "bad Host header").response
    keys = {k.strip() for k in request.headers.get_all("xi-api-key")}  # one, given once or more
    if len(keys) != 1:
        none = Rejection.TWO_KEYS if keys else Rejection.MISSING
        host.auth_failed(none)
        return _json(401, {"detail": none.value})
    entry = host.keyset.lookup(keys.pop())
    admitted = admit(entry, host.router, dt.datetime.now(dt.UTC), agent, "elevenlabs")
    if not isinstance(admitted, Route):
        code, reason, why = admitted
        if why is not None:
            host.auth_failed(why)
        return _json(_STATUS.get(code, 400), {"detail": reason})
    assert entry is not None  # admit refuses an unknown key
    # Deployments in the balancer's order (resting ones skipped), failing over as a
    # session's connect does, and counted in their circuits as its attempts are:
    # private agents' sessions go only where their URL was signed, so these calls may
    # be all a deployment that is down ever sees. All share
    # upstream_connect_timeout_seconds.
    ready, resting = host.balancer.order(admitted, time.monotonic())
    deadline = asyncio.get_running_loop().time() + host.limits.upstream_connect_timeout_seconds
    notes: list[str] = []
    for h, share in shares(ready, deadline, notes):
        if not h.available(time.monotonic()):  # rested, or probed, since
            resting.append(h)
            continue
        try:
            # The deployment's own URL, resource and secret (the route's spec has the
            # deployments' template fields unresolved).
            upstream = host.router.upstream(h.target, agent)
        except RouteError as exc:
            if exc.code != CloseCode.INTERNAL_ERROR:
                return _json(_STATUS.get(exc.code, 500), {"detail": str(exc)})
            host.balancer.misconfigured(h, exc)
            if len(ready) == 1:
                return _json(500, {"detail": str(exc)})
            # This deployment's configuration fault (its secret missing): the next one
            # may sign, as a session's connect goes on to it.
            notes.append(f"{h.name} {exc}")
            continue
        probe = h.begin()
        try:
            signed = await _sign(
                upstream, agent, passed, share, host.balancer.max_rest, host.balancer.resolver
            )
        except BaseException:  # the client left (cancelled): no verdict
            h.abandoned(probe)
            raise
        if isinstance(signed, Failed):
            host.balancer.failed(h, signed, probe)
            if signed.outcome == "local":
                return _json(503, {"detail": str(signed)})
            notes.append(f"{h.name} {signed.short}")
            if signed.failover:
                continue
            break
        host.balancer.succeeded(h)
        h.release()  # a call, not a session: nothing stays live on it
        signature = urllib.parse.parse_qs(signed.query)["conversation_signature"][0]
        host.signed_urls.remember(signature, entry.sha256, h.target.label)
        ours = urllib.parse.urlunsplit(
            ("wss" if secure else "ws", authority, "/v1/convai/conversation", signed.query, "")
        )
        return _json(200, {"signed_url": ours})
    if len(notes) == 1 and not resting:
        return _json(502, {"detail": "provider " + notes[0].partition(" ")[2]})  # its own words
    notes += [f"{h.name} resting" for h in resting]
    return _json(502, {"detail": "provider failed: " + "; ".join(notes)})


async def _sign(
    upstream: Upstream,
    agent: str,
    passed: list[tuple[str, str]],
    timeout: float,
    max_rest: float,
    resolver: Resolver,
) -> _Split | Failed:
    """One deployment's signed URL (split), or what went wrong, classified as a
    session's connect attempt is (its `short` the words of the call's answer)."""
    uri = upstream.uri
    path = uri.resource_name.partition("?")[0]
    authority = build_host(uri.host, uri.port, uri.secure, always_include_port=True)  # [IPv6]:port
    rest = (
        f"{'https' if uri.secure else 'http'}://{authority}{path}/get-signed-url?"
        + urllib.parse.urlencode([("agent_id", agent), *passed], quote_via=urllib.parse.quote)
    )
    try:
        # The whole call, the lookup and a wait for a free thread included, is bounded.
        # (Not wait_for: on Python 3.11 it drops a cancellation, the caller's reset, that
        # comes with the answer.)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            addresses = await resolver.addresses(uri.host, uri.port)  # the sessions' cache
            call = loop.run_in_executor(
                _FETCHERS, _fetch, rest, upstream.headers, upstream.ssl, addresses, timeout
            )
            body = await call
        if len(body) > _MAX_RESPONSE_BYTES:
            raise ValueError("response too large")
        signed = urllib.parse.urlsplit(_decoder.decode(body).signed_url)
    except urllib.error.HTTPError as exc:
        refused = refusal(exc.code, exc.headers.get_all("Retry-After") or [], max_rest)
        return Failed(
            refused.outcome,
            f"signed-URL fetch refused: HTTP {exc.code}",
            f"refused: HTTP {exc.code}",
            refused.failover,
            refused.rest,
            refused.verdict,
        )
    # http.client's HTTPException: an answer that is not HTTP (bad status line, a line
    # too long, a body cut short), a provider fault like any unreadable answer.
    except (OSError, ValueError, msgspec.DecodeError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc  # what urllib wraps
        if isinstance(reason, TimeoutError):
            return Failed("timeout", "signed-URL fetch timed out", "timed out")
        if isinstance(reason, OSError) and (local := exhausted(reason)) is not None:
            return local  # the socket was ours to make: no deployment's fault
        if isinstance(reason, ssl.SSLError):
            outcome = "tls"
        elif isinstance(reason, OSError) and not isinstance(reason, http.client.HTTPException):
            outcome = "tcp"
            resolver.forget(uri.host, uri.port)  # the addresses may be dead, as for a session
        else:  # not HTTP, cut short (RemoteDisconnected too), too large, or not the JSON
            outcome = "invalid"
        # Fixed words: an exception's text may quote the provider's answer.
        return Failed(outcome, f"signed-URL fetch failed ({outcome})", "unreachable or invalid answer")
    if not urllib.parse.parse_qs(signed.query).get("conversation_signature", [""])[0]:
        words = "gave a signed URL without a signature"
        return Failed("invalid", f"signed-URL fetch {words}", words)
    return signed
