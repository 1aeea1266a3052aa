"""Deployments, selection, connect-time failover and the circuit breaker.

Each deployment is a real server on loopback started by the test: a WebSocket server
that says which deployment it is in its first message, or one that answers an HTTP
error, never answers, or presents a certificate from an untrusted CA. The sidecar runs
as its own process and is reached by real clients (websockets, the OpenAI SDK).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import msgspec
import pytest
from conftest import (PROVIDER_SECRET, Keys, SidecarProcess, SlowUpstream, held_port, run, short_frame,
                      standard_keys, switching_protocols)
from test_governance import metric as total
from test_limits import pending_becomes
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from conduit_sidecar import config as config_mod
from conduit_sidecar.config import ConfigError
from conduit_sidecar.keys import hash_key, new_key
from conduit_sidecar.metrics import Metrics
from conduit_sidecar.mock import MockProvider
from conduit_sidecar.routing import Router
from conduit_sidecar.testing import CA
from conduit_sidecar.upstream import Balancer, Health, _retry_after

# -- deployments as loopback servers ----------------------------------------------

class Named:
    """A WebSocket deployment whose first message names it."""

    def __init__(self, name: str, port: int | None = None, ssl=None):
        self.name, self.port, self.ssl = name, port or held_port(), ssl
        self.handshakes = 0

    async def __aenter__(self):
        def count(connection, request):
            self.handshakes += 1

        async def handler(ws):
            await ws.send(json.dumps({"type": "session.created", "deployment": self.name}))
            async for message in ws:
                await ws.send(message)
        self.server = await serve(handler, "127.0.0.1", self.port, ssl=self.ssl,
                                  process_request=count, compression=None)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


class Refusing:
    """Answers every upgrade with an HTTP status (and headers)."""

    def __init__(self, status: str, headers: str = "", port: int | None = None):
        self.status, self.headers, self.port = status, headers, port or held_port()
        self.requests = 0

    async def handle(self, reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        writer.write(f"HTTP/1.1 {self.status}\r\n{self.headers}Content-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc):
        self.server.close()


class Choosy(Named):
    """Serves every model but one its project may not use, which it answers with 403
    (Deepgram's INSUFFICIENT_PERMISSIONS, OpenAI's realtime model without access)."""

    def __init__(self, name: str, forbidden: str = "forbidden"):
        super().__init__(name)
        self.forbidden, self.refused = forbidden, 0

    async def __aenter__(self):
        async def choose(connection, request):
            if f"model={self.forbidden}" in request.path:
                self.refused += 1
                return connection.respond(403, "project does not have access to the requested model\n")
            self.handshakes += 1

        async def handler(ws):
            await ws.send(json.dumps({"type": "session.created", "deployment": self.name}))
            async for message in ws:
                await ws.send(message)
        self.server = await serve(handler, "127.0.0.1", self.port, process_request=choose,
                                  compression=None)
        return self


class Blackhole(Refusing):
    """Accepts TCP, never answers."""

    def __init__(self, port: int | None = None):
        super().__init__("", port=port)
        self.held = []

    async def handle(self, reader, writer):
        self.requests += 1
        self.held.append(writer)
        await reader.read(1 << 16)


def sidecar_with(workdir: str, providers: str, timeout: float = 2.0,
                 extra: str = "") -> SidecarProcess:
    return SidecarProcess(workdir, providers, standard_keys(), extra=extra,
                          limits=f"upstream_connect_timeout_seconds = {timeout}\n").start()


def deployments(*entries: str, selection: str = "least_sessions", extra: str = "") -> str:
    """A provider `p` whose deployments are the given TOML inline bodies, in order."""
    body = "".join(f"\n[[providers.p.deployments]]\n{e}\n" for e in entries)
    return (f'[providers.p]\nurl = "ws://127.0.0.1:1/"\nselection = "{selection}"\n{extra}'
            + body)


def ws_url(port: int, scheme: str = "ws") -> str:
    return f'url = "{scheme}://127.0.0.1:{port}/"'


async def open_session(sidecar, provider="p", model="m"):
    """Connect; returns (ws, name of the deployment that serves it)."""
    ws = await connect(sidecar.url(model=model, provider=provider),
                       additional_headers=sidecar.auth(), open_timeout=10)
    return ws, json.loads(await ws.recv())["deployment"]


async def served_by(sidecar, provider="p") -> str:
    """Open a session and close it; the name of the deployment that served it."""
    ws, name = await open_session(sidecar, provider)
    await ws.close()
    return name


async def close_of(sidecar, provider="p", model="m"):
    async with connect(sidecar.url(model=model, provider=provider),
                       additional_headers=sidecar.auth(), open_timeout=10) as ws:
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code, exc.rcvd.reason


def metric(sidecar, name: str, timeout: float = 5, **labels) -> float | None:
    with urllib.request.urlopen(sidecar.admin("/metrics"), timeout=timeout) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def ended(sidecar) -> list[dict]:
    return [line for line in sidecar.log_lines() if line.get("event") == "session_end"]


async def ends_reach(sidecar, n: int) -> None:
    """Wait (5 s at most) for n session_end lines: the sidecar sees a session end
    after its client is done with it."""
    deadline = time.monotonic() + 5
    while (have := len(ended(sidecar))) < n:
        assert time.monotonic() < deadline, f"{have} session_end lines, not {n}"
        await asyncio.sleep(0.05)


@pytest.fixture
def workdir():
    return tempfile.mkdtemp(prefix="conduit-deploy-")


# -- 1. selection -------------------------------------------------------------------

def _balancer(toml: str, seed: int = 7) -> tuple[Balancer, Router]:
    import random
    conf = msgspec.convert(msgspec.toml.decode(toml.encode()), config_mod.Config)
    router = Router(conf, environ={"K": "secret"})
    return Balancer(router, conf, Metrics(lambda: 0, lambda: 0, lambda: 0, 48000), random.Random(seed)), router


def test_weighted_selection_statistics_over_4000_picks():
    """The selection rule itself, without sockets: 3:1 weights give 75/25 (±5%)."""
    balancer, router = _balancer(
        '[providers.p]\nurl = "ws://h/"\n'
        '[[providers.p.deployments]]\nname = "big"\nweight = 3\n'
        '[[providers.p.deployments]]\nname = "small"\nweight = 1\n')
    firsts = [balancer.order(router.routes["p"], 0.0)[0][0].target.label for _ in range(4000)]
    share = firsts.count("big") / 4000
    assert 0.70 <= share <= 0.80
    # The failover order holds every deployment once.
    ready, resting = balancer.order(router.routes["p"], 0.0)
    assert sorted(h.target.label for h in ready) == ["big", "small"] and resting == []
    # A resting one is told apart (the close reason's `p/x resting`), with two or none ready.
    big, small = balancer.health["p"]
    big.failed(0.0, at_once=True)
    assert balancer.order(router.routes["p"], 0.0) == ([small], [big])
    small.failed(0.0, at_once=True)
    assert balancer.order(router.routes["p"], 0.0) == ([], [big, small])


def test_weights_3_to_1_over_real_sessions(workdir):
    """Real sessions through the sidecar land 75/25 within ±5%. 1,000 rather than
    4,000 keeps the test near 15 s on a shared machine; ±5 points is still 3.6
    standard deviations at n = 1,000 (the 4,000-pick statistics are checked above)."""
    big, small = Named("big"), Named("small")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "big"\nweight = 3\n{ws_url(big.port)}',
        f'name = "small"\nweight = 1\n{ws_url(small.port)}', selection="weighted"))

    async def body():
        async with big, small:
            counts = {"big": 0, "small": 0}
            sem = asyncio.Semaphore(16)

            async def one():
                async with sem:
                    ws, name = await open_session(sidecar)
                    counts[name] += 1
                    await ws.close()
            await asyncio.gather(*(one() for _ in range(N)))
            return counts
    N = 1000
    try:
        counts = run(body(), timeout=120)
    finally:
        sidecar.stop()
    assert sum(counts.values()) == N
    assert 0.70 <= counts["big"] / N <= 0.80, counts


def test_least_sessions_keeps_live_counts_within_one(workdir):
    servers = [Named(n) for n in ("a", "b", "c")]
    sidecar = sidecar_with(workdir, deployments(
        *(f'name = "{s.name}"\n{ws_url(s.port)}' for s in servers)))

    async def body():
        async with servers[0], servers[1], servers[2]:
            live: dict[str, list] = {"a": [], "b": [], "c": []}
            # 30 at once: counts are taken when a deployment is chosen, not at the 101.
            for ws, name in await asyncio.gather(*(open_session(sidecar) for _ in range(30))):
                live[name].append(ws)
            spread = [len(v) for v in live.values()]
            # Sessions end on one deployment; new ones fill it first.
            for ws in live["a"][:6]:
                await ws.close()
            del live["a"][:6]
            await ends_reach(sidecar, 6)     # the sidecar sees the ends
            refill = []
            for _ in range(6):
                ws, name = await open_session(sidecar)
                live[name].append(ws)
                refill.append(name)
                counts = [len(v) for v in live.values()]
                assert max(counts) - min(counts) <= 6    # never drifts further apart
            after = [len(v) for v in live.values()]
            for group in live.values():
                for ws in group:
                    await ws.close()
            return spread, refill, after
    try:
        spread, refill, after = run(body())
    finally:
        sidecar.stop()
    assert max(spread) - min(spread) <= 1, spread
    assert refill == ["a"] * 6
    assert max(after) - min(after) <= 1, after


# -- 2. failover from each kind of failure -------------------------------------------

@pytest.mark.parametrize("kind, outcome", [
    ("503", "http_5xx"), ("500", "http_5xx"), ("blackhole", "timeout"), ("badcert", "tls"),
    ("429", "http_429")])
def test_failover_to_the_next_deployment(workdir, kind, outcome):
    good = Named("good")
    trusted = CA("trusted CA")
    ca_file = trusted.write(os.path.join(workdir, "trusted.pem"))
    if kind == "503":
        bad = Refusing("503 Service Unavailable")
    elif kind == "500":
        bad = Refusing("500 Internal Server Error")
    elif kind == "429":
        bad = Refusing("429 Too Many Requests", "Retry-After: 2\r\n")
    elif kind == "blackhole":
        bad = Blackhole()
    else:   # a certificate from a CA the sidecar does not trust
        bad = Named("bad", ssl=CA("stranger CA").server_context(workdir))
    scheme = "wss" if kind == "badcert" else "ws"
    sidecar = sidecar_with(workdir, deployments(
        f'name = "bad"\n{ws_url(bad.port, scheme)}\nca_file = "{ca_file}"',
        f'name = "good"\n{ws_url(good.port)}'))

    async def body():
        async with bad, good:
            served = []
            for _ in range(2):
                ws, name = await open_session(sidecar)
                served.append(name)
                await ws.send("ping")
                assert await ws.recv() == "ping"
                await ws.close()
            tried = bad.requests if hasattr(bad, "requests") else bad.handshakes
            if kind == "429":       # rested for Retry-After (2 s), then tried again
                await asyncio.sleep(2.2)
                ws, name = await open_session(sidecar)
                served.append(name)
                await ws.close()
            await ends_reach(sidecar, len(served))
            return served, tried, (bad.requests if hasattr(bad, "requests") else None)
    try:
        served, tried, later = run(body())
    finally:
        sidecar.stop()
    assert set(served) == {"good"}
    attempts = [line for line in sidecar.log_lines() if line.get("event") == "upstream_attempt"]
    assert attempts and {a["deployment"] for a in attempts} == {"bad"}
    assert {a["outcome"] for a in attempts} == {outcome}
    assert PROVIDER_SECRET not in sidecar.output()
    assert [e["deployment"] for e in ended(sidecar)] == ["good"] * len(served)
    assert all(e["provider"] == "p" for e in ended(sidecar))
    if kind == "429":
        assert tried == 1           # the second session did not knock
        assert later == 2           # after the Retry-After: one probe
    elif kind != "badcert":
        assert tried == 2           # one failure is not a circuit


def test_403s_a_client_asks_for_rest_no_deployment_a_401_rests_at_once(workdir):
    """Providers answer 403 for what the request asks (a model the project may not
    use), not only for our credential. A key holder asking for such a model, session
    after session, rested every deployment of the provider at once (403 counted as a
    configuration fault), so every other app got 1014 `... resting`. A 403 now goes on
    to the next deployment, which may have access, and gives no verdict: the others are
    served as before. A 401 (the credential refused) still rests its deployment at
    once, logged at error level."""
    bad = Refusing("401 Unauthorized")
    a, b = Choosy("a"), Choosy("b")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "bad"\n{ws_url(bad.port)}', *(f'name = "{s.name}"\nurl = "ws://127.0.0.1:{s.port}/?model={{model}}"' for s in (a, b))),
        extra="[circuit]\nfailures = 2\ncooldown_seconds = 60\n")

    async def body():
        async with bad, a, b:
            refused = [await close_of(sidecar, model="forbidden") for _ in range(4)]
            served = [await served_by(sidecar) for _ in range(2)]
            return refused, served, bad.requests, a.refused, b.refused
    try:
        refused, served, asked_bad, refused_a, refused_b = run(body())
        healthy = {d: metric(sidecar, "conduit_deployment_healthy", deployment=d, provider="p")
                   for d in ("bad", "a", "b")}
        forbidden = metric(sidecar, "conduit_upstream_attempts_total", deployment="a",
                           outcome="http_403", provider="p")
    finally:
        sidecar.stop()
    assert refused[0] == (1014, "upstream failed: p/bad HTTP 401; p/a HTTP 403; p/b HTTP 403")
    assert refused[1:] == [(1014, "upstream failed: p/a HTTP 403; p/b HTTP 403; p/bad resting")] * 3
    assert served == ["a", "a"]           # without: 1014 "... p/a resting; p/b resting"
    assert (asked_bad, refused_a, refused_b) == (1, 4, 4)
    assert healthy == {"bad": 0, "a": 1, "b": 1}
    assert forbidden == 4
    attempts = [line for line in sidecar.log_lines() if line.get("event") == "upstream_attempt"]
    assert {(x["deployment"], x["outcome"], x["level"]) for x in attempts} == {
        ("bad", "http_auth", "error"), ("a", "http_403", "warning"), ("b", "http_403", "warning")}


@pytest.mark.parametrize("retry_after", [
    "Retry-After: 1\r\nRetry-After: 2\r\n",
    # A zone offset past a C int: parsedate_to_datetime raised OverflowError.
    "Retry-After: Wed, 21 Oct 2015 07:28:00 +99999999999999999999\r\n",
])
def test_a_429_with_two_retry_after_headers_fails_over(workdir, retry_after):
    """A 429 that repeats Retry-After: reading the header raised (websockets' Headers
    refuses a lookup of a repeated header), so the session ended as a bug of ours (HTTP
    500, no other deployment tried); so did a date whose zone offset overflows. The
    header is ignored: the deployment is counted as any 429 without one, and the next
    one serves."""
    bad = Refusing("429 Too Many Requests", retry_after)
    good = Named("good")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "bad"\n{ws_url(bad.port)}', f'name = "good"\n{ws_url(good.port)}'))

    async def body():
        async with bad, good:
            return await served_by(sidecar), bad.requests
    try:
        served, asked = run(body())
    finally:
        sidecar.stop()
    assert (served, asked) == ("good", 1)
    attempt, = [line for line in sidecar.log_lines() if line.get("event") == "upstream_attempt"]
    assert (attempt["deployment"], attempt["outcome"]) == ("bad", "http_429")
    assert attempt["resting_seconds"] is None      # one failure is not a circuit: no rest


class Scripted(Refusing):
    """Answers its n-th upgrade as `script[n]` says (the last entry repeats): "429"
    with `retry_after`, "held" (the 101 once `release` is set; `asked` is set when its
    request came) or "ok" (the 101 at once), then keeps the connection until the
    sidecar lets go."""

    def __init__(self, script: list[str], retry_after: str):
        super().__init__("")
        self.script, self.retry_after = script, retry_after
        self.asked, self.release = asyncio.Event(), asyncio.Event()

    async def handle(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        mode = self.script[min(self.requests, len(self.script) - 1)]
        self.requests += 1
        if mode == "429":
            writer.write(f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: {self.retry_after}\r\n"
                         "Content-Length: 0\r\n\r\n".encode())
            writer.close()
            return
        if mode == "held":
            self.asked.set()
            await self.release.wait()
        hello = b'{"deployment": "x"}'
        writer.write(switching_protocols(head) + bytes([0x81, len(hello)]) + hello)
        await reader.read(1)    # the client's close: gone at once, not after a close timeout
        writer.close()


@pytest.mark.parametrize("retry_after", ["0", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_a_429_that_says_retry_now_rests_nothing(workdir, retry_after):
    """`Retry-After: 0` (or a date gone by) says: retry now. It rested the deployment for
    no time, but a rest all the same: its circuit was open (healthy 0) until a probe
    connected, so while the next session's attempt was under way as that probe, every
    other session skipped the deployment (here its only one: 1014 `p/x resting`). It is
    counted as a 429 without the header is: a failure toward the circuit, no rest."""
    x = Scripted(["429", "held", "ok"], retry_after)
    sidecar = sidecar_with(workdir, deployments(f'name = "x"\n{ws_url(x.port)}'), timeout=10)

    async def served_or_closed():
        async with connect(sidecar.url(model="m", provider="p"), additional_headers=sidecar.auth(),
                           open_timeout=10) as ws:
            try:
                return json.loads(await ws.recv())["deployment"]
            except ConnectionClosed as exc:
                return exc.rcvd.code, exc.rcvd.reason

    async def body():
        async with x:
            refused = await served_or_closed()
            healthy = metric(sidecar, "conduit_deployment_healthy", deployment="x", provider="p")
            slow = asyncio.ensure_future(served_or_closed())
            await x.asked.wait()                # its attempt is under way
            try:
                meanwhile = await served_or_closed()
            finally:
                x.release.set()
            return refused, healthy, meanwhile, await slow
    try:
        refused, healthy, meanwhile, name = run(body())
    finally:
        sidecar.stop()
    assert refused == (1014, "upstream refused: HTTP 429")
    assert healthy == 1                     # without: 0
    assert meanwhile == "x"                 # without: (1014, "upstream failed: p/x resting")
    assert name == "x"


class Unfinished(Refusing):
    """Answers with an HTTP status and headers, then a body that does not come whole:
    the connection is held open (`cut` False) or closed."""

    def __init__(self, status: str, headers: str, body: str, cut: bool):
        super().__init__(status, headers)
        self.body, self.cut = body, cut

    async def handle(self, reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        writer.write(f"HTTP/1.1 {self.status}\r\n{self.headers}\r\n{self.body}".encode())
        await writer.drain()
        if not self.cut:
            await reader.read()
        writer.close()


@pytest.mark.parametrize("status, headers, body, cut, outcome", [
    ("401 Unauthorized", "Content-Length: 100\r\n", "half", False, "http_auth"),
    ("429 Too Many Requests", "Retry-After: 30\r\nTransfer-Encoding: chunked\r\n", "40\r\npart", False,
     "http_429"),
    ("503 Service Unavailable", "", "<html>no length, the connection kept", False, "http_5xx"),
    ("502 Bad Gateway", "Content-Length: 100\r\n", "half", True, "http_5xx"),
    ("500 Internal Server Error", "Content-Length: 1000000000\r\n", "", False, "http_5xx"),
    ("403 Forbidden", "Transfer-Encoding: gzip\r\n", "", False, "http_403"),
    ("404 Not Found", "Content-Length: 100\r\n", "half", False, "http_other"),
    # A redirect (never followed) says the deployment's URL is stale: it was `http_other`,
    # the request's fault, and every session drawn to it first got 1014.
    ("301 Moved Permanently", "Location: ws://127.0.0.1:9/\r\nContent-Length: 0\r\n", "", False, "http_3xx"),
    # So does a success that is no upgrade (a page, a health check, a proxy's own answer).
    ("200 OK", "Content-Length: 2\r\n", "ok", False, "http_2xx"),
])
def test_a_refusal_is_judged_by_its_status_whatever_its_body(workdir, status, headers, body, cut, outcome):
    """The sidecar read a refusal's body before judging it. A body that came slowly or
    not at all (a Content-Length not met, a chunk unfinished, no length on a kept
    connection) made it a `timeout` at the end of the deployment's share; one cut short,
    over 1 MB declared, or in an encoding websockets does not read made it `invalid`: a
    401 did not rest its deployment nor log the configuration fault, a 429's Retry-After
    was lost, a 403 counted toward the circuit, a 404 (the request's fault) failed over.
    The status and headers decide; the body is not read."""
    bad = Unfinished(status, headers, body, cut)
    good = Named("good")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "bad"\n{ws_url(bad.port)}', f'name = "good"\n{ws_url(good.port)}'), timeout=4)

    async def body_():
        async with bad, good:
            async with connect(sidecar.url(model="m", provider="p"), additional_headers=sidecar.auth(),
                               open_timeout=10) as ws:
                try:    # the deployment that serves it, or the close
                    got = json.loads(await ws.recv())["deployment"]
                except ConnectionClosed as exc:
                    got = exc.rcvd.code, exc.rcvd.reason
            return got, bad.requests, good.handshakes
    try:
        got, asked_bad, asked_good = run(body_())
        healthy = metric(sidecar, "conduit_deployment_healthy", deployment="bad", provider="p")
    finally:
        sidecar.stop()
    attempt, = [line for line in sidecar.log_lines() if line.get("event") == "upstream_attempt"]
    assert (attempt["deployment"], attempt["outcome"]) == ("bad", outcome), attempt
    assert asked_bad == 1
    if outcome == "http_other":
        assert (got, asked_good) == ((1014, "upstream refused: HTTP 404"), 0)
    else:
        assert (got, asked_good) == ("good", 1)
    # A 401 rests its deployment at once, a 429 for its Retry-After.
    assert healthy == (0 if outcome in ("http_auth", "http_429") else 1)


def test_a_session_whose_first_message_is_held_fails_over_after_its_101(workdir):
    """Gemini names its model in its first message: the client has its 101 before any
    deployment is tried. A refusing one is still skipped for the next, as the session's
    provider has not answered yet."""
    bad, good = Refusing("503 Service Unavailable"), Named("good")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "bad"\n{ws_url(bad.port)}', f'name = "good"\n{ws_url(good.port)}'
    ).replace("[providers.p]", "[providers.gemini]").replace("providers.p.", "providers.gemini."))
    path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    setup = json.dumps({"setup": {"model": "models/gemini-live"}})

    async def body():
        async with bad, good:
            async with connect(f"ws://127.0.0.1:{sidecar.port}{path}?key={sidecar.keys.plain['good']}",
                               open_timeout=10) as ws:
                await ws.send(setup)
                first = json.loads(await ws.recv())
                return first["deployment"], await ws.recv()
    try:
        served, echoed = run(body())
    finally:
        sidecar.stop()
    assert (served, echoed, bad.requests) == ("good", setup, 1)
    attempts = [(a["deployment"], a["outcome"]) for a in sidecar.log_lines() if a.get("event") == "upstream_attempt"]
    assert attempts == [("bad", "http_5xx")]


def test_all_deployments_down_gives_1014_naming_each_attempt(workdir):
    hole, refusing = Blackhole(), Refusing("503 Service Unavailable")
    badtls = Named("x", ssl=CA("stranger CA").server_context(workdir))
    ca_file = CA("trusted CA").write(os.path.join(workdir, "trusted.pem"))
    sidecar = sidecar_with(workdir, deployments(
        f'name = "hole"\n{ws_url(hole.port)}',
        ws_url(refusing.port),
        f'name = "tls"\n{ws_url(badtls.port, "wss")}\nca_file = "{ca_file}"',
        f'name = "gone"\n{ws_url(held_port())}'), timeout=2.0)

    async def body():
        async with hole, refusing, badtls:
            return await close_of(sidecar)
    try:
        code, reason = run(body())
    finally:
        sidecar.stop()
    assert code == 1014
    # One connect timeout, not one per attempt: the hole (tried first) used only its
    # share of it, so each deployment after it was still tried (not "not tried").
    assert reason == "upstream failed: p/hole timeout; p/1 HTTP 503; p/tls TLS; p/gone TCP refused"
    assert "upstream failed" in {line.get("reason", "")[:15] for line in sidecar.log_lines()}



class Gated(Refusing):
    """Reads the upgrade (`asked` set), then answers its status once `go` is set."""

    def __init__(self, status: str):
        super().__init__(status)
        self.asked, self.go = asyncio.Event(), asyncio.Event()

    async def handle(self, reader, writer):
        self.asked.set()
        await self.go.wait()
        await super().handle(reader, writer)


@pytest.mark.parametrize("then", ["good", "none"])
def test_a_key_revoked_while_its_session_fails_over_dials_no_further(workdir, then):
    """The key is removed from the key file while the first deployment keeps the
    session waiting; it then refuses (503). The failover went on: the next deployment
    was connected (with the deployment's secret) for a session that then got 4001 and
    the provider's connection dropped; with no deployment after it, the client got 1014
    `upstream refused: HTTP 503`. The key is checked before each next attempt and
    after the last: 4001 `key revoked`, as a key revoked before the 101 is answered,
    and no other deployment asked."""
    keys = Keys()
    alpha = keys.add("alpha")
    first, good = Gated("503 Service Unavailable"), Named("good")
    listed = [f'name = "first"\n{ws_url(first.port)}', f'name = "good"\n{ws_url(good.port)}']
    sidecar = SidecarProcess(workdir, deployments(*listed[: 2 if then == "good" else 1]), keys,
                             limits="upstream_connect_timeout_seconds = 10\n").start()

    async def body():
        async with first, good:
            attempt = asyncio.ensure_future(connect(
                sidecar.url(model="m", provider="p"), additional_headers={"Authorization": f"Bearer {alpha}"},
                open_timeout=10))
            await asyncio.wait_for(first.asked.wait(), 5)
            with open(sidecar.keys_file, "w") as f:
                f.write('{"keys": []}')
            while metric(sidecar, "conduit_keys_reload_total", result="ok") != 1:
                await asyncio.sleep(0.05)                   # (run's timeout bounds it)
            first.go.set()
            ws = await attempt
            try:
                await ws.recv()
            except ConnectionClosed as exc:
                return exc.rcvd.code, exc.rcvd.reason, good.handshakes
    try:
        assert run(body()) == (4001, "key revoked", 0)       # without: good connected, or 1014
    finally:
        sidecar.stop()
    rejected = [(line["code"], line["reason"]) for line in sidecar.log_lines() if line.get("event") == "rejected"]
    assert rejected == [(4001, "key revoked")]
    attempts = [(a["deployment"], a["outcome"]) for a in sidecar.log_lines() if a.get("event") == "upstream_attempt"]
    assert attempts == [("first", "http_5xx")]             # its verdict still counts

# -- 4. the circuit breaker ---------------------------------------------------------

def test_circuit_rests_a_failing_deployment_then_probes_it(workdir):
    port = held_port()
    good = Named("good")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "flaky"\n{ws_url(port)}', f'name = "good"\n{ws_url(good.port)}'),
        extra="[circuit]\nfailures = 3\ncooldown_seconds = 2\nmax_cooldown_seconds = 30\n")

    async def body():
        flaky = Refusing("503 Service Unavailable", port=port)
        async with good:
            async with flaky:
                served = [await served_by(sidecar) for _ in range(3)]
                after_three = flaky.requests
                healthy_open = metric(sidecar, "conduit_deployment_healthy",
                                      deployment="flaky", provider="p")
                served += [await served_by(sidecar) for _ in range(3)]      # resting: not tried
                resting = flaky.requests
                await asyncio.sleep(2.3)
                served.append(await served_by(sidecar))                     # the probe: fails
                probed = flaky.requests
                served.append(await served_by(sidecar))                     # rests 4 s now
                after_probe = flaky.requests
            await asyncio.sleep(4.3)
            async with Named("flaky", port=port) as recovered:
                back = [await served_by(sidecar) for _ in range(3)]         # probe succeeds
                probes = recovered.handshakes
            healthy = metric(sidecar, "conduit_deployment_healthy", deployment="flaky",
                             provider="p")
            failed = metric(sidecar, "conduit_upstream_attempts_total", deployment="flaky",
                            outcome="http_5xx", provider="p")
            return (served, after_three, healthy_open, resting, probed, after_probe, back,
                    probes, healthy, failed)
    try:
        (served, after_three, healthy_open, resting, probed, after_probe, back, probes,
         healthy, failed) = run(body())
    finally:
        sidecar.stop()
    assert served == ["good"] * 8
    assert (after_three, resting, probed, after_probe) == (3, 3, 4, 4)
    assert healthy_open == 0.0 and healthy == 1.0
    assert back == ["flaky"] * 3 and probes == 3
    assert failed == 4.0


def test_one_probe_while_sessions_arrive_together(workdir):
    """After the rest, five sessions at once: one probes (and waits out its share of
    the connect timeout on a deployment that now never answers), four go elsewhere."""
    port = held_port()
    good = Named("good")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "flaky"\n{ws_url(port)}', f'name = "good"\n{ws_url(good.port)}'),
        extra="[circuit]\nfailures = 1\ncooldown_seconds = 1\n")

    async def body():
        async with good:
            async with Refusing("503 Service Unavailable", port=port):
                first = await served_by(sidecar)
            await asyncio.sleep(1.2)
            async with Blackhole(port) as hole:
                served = await asyncio.gather(*(served_by(sidecar) for _ in range(5)))
                return first, served, hole.requests
    try:
        first, served, probes = run(body())
    finally:
        sidecar.stop()
    assert first == "good" and served == ["good"] * 5
    assert probes == 1



def test_a_timeout_in_a_share_cut_short_rests_nothing_a_whole_one_does(workdir):
    """Two deployments share the connect timeout (1 s): the first, healthy but slow to
    answer (its 101 after 0.8 s), had 0.5 s. Its timeout was counted toward the circuit
    (`failures = 1`: rested for 60 s, every later session sent to the other), though
    with the whole timeout it connects. A timeout once the deployment took the TCP
    connection counts only when the attempt had the whole timeout: a provider's only
    deployment (`q`, one that never answers) is rested by its timeout."""
    slow_port = held_port()
    good, hole = Named("good"), Blackhole()
    sidecar = sidecar_with(
        workdir,
        deployments(f'name = "slow"\n{ws_url(slow_port)}', f'name = "good"\n{ws_url(good.port)}')
        + f'[providers.q]\nurl = "ws://127.0.0.1:{hole.port}/"\n',
        timeout=1.0, extra="[circuit]\nfailures = 1\ncooldown_seconds = 60\n")

    async def body():
        async with SlowUpstream(slow_port, delay=0.8), good, hole:
            for attempt in range(3):
                try:
                    served = await served_by(sidecar)
                    break
                except ConnectionClosed as closed:
                    # A sidecar held up on a loaded machine for the rest of the 1 s in
                    # slow's share leaves good none: it is tried again.
                    if attempt == 2 or "p/good" not in closed.rcvd.reason:
                        raise
            alone = await close_of(sidecar, provider="q")
            return served, alone
    try:
        served, alone = run(body())
        healthy = {p: metric(sidecar, "conduit_deployment_healthy", deployment=d, provider=p)
                   for p, d in (("p", "slow"), ("q", "0"))}
    finally:
        sidecar.stop()
    assert served == "good" and alone == (1014, "upstream timed out (WebSocket handshake)")
    assert healthy == {"p": 1.0, "q": 0.0}                 # without: p/slow rested too
    attempts = [(a["provider"], a["outcome"], a["resting_seconds"]) for a in sidecar.log_lines()
                if a.get("event") == "upstream_attempt"]
    p = [a for a in attempts if a[0] == "p"]               # one, but for the tries again
    assert p and all(a[1:] == ("timeout", None) for a in p)
    (q,) = attempts[len(p):]
    assert q[:2] == ("q", "timeout") and q[2] > 50

class Ending(Named):
    """Accepts every upgrade, then ends the session as `how` says: "1011" at once (a
    region out of quota), "reset" at once (its TCP connection reset), "after_message"
    (1011 once the client has sent a message), "late" (1011 after 1.5 s, nothing asked)."""

    def __init__(self, name: str, how: str):
        super().__init__(name)
        self.how = how

    async def __aenter__(self):
        async def handler(ws):
            self.handshakes += 1
            if self.how == "reset":
                # A reset that came before the sidecar read the 101 could fail the
                # handshake (a failover, not this case): the 101 is read well before.
                await asyncio.sleep(0.05)
                sock = ws.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                ws.transport.abort()
                return
            if self.how == "after_message":
                await ws.recv()
            elif self.how == "late":
                await asyncio.sleep(1.5)
            await ws.close(1011, "quota exhausted")
        self.server = await serve(handler, "127.0.0.1", self.port, compression=None)
        return self


async def session_codes(sidecar, n: int, send: bool = False) -> list[tuple[int, str | None]]:
    """n sessions one after another, each to its end (its session_end line written):
    (the close code the client read, the deployment named by its first message)."""
    codes, before = [], len(ended(sidecar))
    for i in range(n):
        async with connect(sidecar.url(model="m", provider="p"), additional_headers=sidecar.auth(),
                           open_timeout=10) as ws:
            if send:
                await ws.send("hello")
            name = None
            try:
                while True:
                    name = json.loads(await ws.recv())["deployment"]
                    await ws.close()
            except ConnectionClosed as exc:
                codes.append((exc.rcvd.code if exc.rcvd else 1006, name))
        await ends_reach(sidecar, before + i + 1)
    return codes


def attempts_of(sidecar, deployment: str) -> dict[str, float]:
    return {o: metric(sidecar, "conduit_upstream_attempts_total", deployment=deployment, outcome=o,
                      provider="p") or 0.0 for o in ("ok", "early_close")}


@pytest.mark.parametrize("how, code", [("1011", 1011), ("reset", 1014)])
def test_a_deployment_that_ends_every_session_at_once_rests(workdir, how, code):
    """A deployment that answers 101 and ends the session at once (a region out of
    quota closing every session with 1011, or its connection reset) was counted a good
    connect: listed first with least_sessions it got every session (10 of 10 ended
    1011), `conduit_deployment_healthy` stayed 1. Its early close is now a failure (no
    failover: the session still ends), the connect alone clears no failures in a row,
    so `failures = 2` of them rest it; a probe that ends at once doubles the rest."""
    broken, good = Ending("broken", how), Named("good")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "broken"\n{ws_url(broken.port)}', f'name = "good"\n{ws_url(good.port)}'),
        extra="[circuit]\nfailures = 2\ncooldown_seconds = 1\nmax_cooldown_seconds = 30\n")

    async def body():
        async with broken, good:
            first = await session_codes(sidecar, 3)
            healthy = metric(sidecar, "conduit_deployment_healthy", deployment="broken", provider="p")
            await asyncio.sleep(1.2)                # the rest is over: one probe, ended at once
            probed = await session_codes(sidecar, 2)
            return first, healthy, probed
    try:
        first, healthy, probed = run(body())
        counted = attempts_of(sidecar, "broken")
    finally:
        sidecar.stop()
    assert [c for c, _ in first[:2]] == [code, code] and first[2] == (1000, "good")
    assert healthy == 0                                     # without: 1, and 3 of 3 to broken
    assert [c for c, _ in probed] == [code, 1000] and probed[1][1] == "good"
    assert counted == {"ok": 0, "early_close": 3}
    logged = [line for line in sidecar.log_lines() if line.get("event") == "upstream_attempt"]
    assert [(x["deployment"], x["outcome"]) for x in logged] == [("broken", "early_close")] * 3
    assert logged[0]["resting_seconds"] is None and logged[1]["resting_seconds"] <= 1.0
    assert logged[2]["resting_seconds"] > 1.0               # the probe's failure: 2 s
    # Each names the session it judged (the one whose session_end names `broken`).
    assert [x["session_id"] for x in logged] == [
        e["session_id"] for e in ended(sidecar) if e["deployment"] == "broken"]
    assert PROVIDER_SECRET not in sidecar.output()


@pytest.mark.parametrize("how", ["after_message", "late"])
def test_a_session_ended_after_client_input_or_its_first_second_rests_nothing(workdir, how):
    """A 1011 that follows a client's message may be the client's doing (a tenant must
    not rest a deployment for everyone), and one after the first second is the
    session's own: neither counts against the deployment, even with `failures = 1`;
    each connect is counted `ok`."""
    broken, good = Ending("broken", how), Named("good")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "broken"\n{ws_url(broken.port)}', f'name = "good"\n{ws_url(good.port)}'),
        extra="[circuit]\nfailures = 1\ncooldown_seconds = 60\n")
    n = 3 if how == "after_message" else 2

    async def body():
        async with broken, good:
            return await session_codes(sidecar, n, send=how == "after_message"), broken.handshakes
    try:
        codes, handshakes = run(body())
        healthy = metric(sidecar, "conduit_deployment_healthy", deployment="broken", provider="p")
        counted = attempts_of(sidecar, "broken")
    finally:
        sidecar.stop()
    assert [c for c, _ in codes] == [1011] * n and handshakes == n
    assert healthy == 1 and counted == {"ok": n, "early_close": 0}
    assert not [line for line in sidecar.log_lines() if line.get("event") == "upstream_attempt"]


def test_a_held_first_message_is_client_input_an_early_close_after_it_rests_nothing(workdir):
    """Gemini's `setup` is held until the provider answers, then relayed first: a 1011
    at once after it may answer what the client asked (a bad setup), so it counts
    against no deployment."""
    broken, good = Ending("broken", "1011"), Named("good")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "broken"\n{ws_url(broken.port)}', f'name = "good"\n{ws_url(good.port)}',
        extra="").replace("[providers.p]", "[providers.gemini]").replace("providers.p.", "providers.gemini.")
        + "[circuit]\nfailures = 1\ncooldown_seconds = 60\n")
    path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    setup = json.dumps({"setup": {"model": "models/gemini-live"}})

    async def body():
        codes = []
        async with broken, good:
            for i in range(2):
                async with connect(f"ws://127.0.0.1:{sidecar.port}{path}?key={sidecar.keys.plain['good']}",
                                   open_timeout=10) as ws:
                    await ws.send(setup)
                    try:
                        await ws.recv()
                    except ConnectionClosed as exc:
                        codes.append(exc.rcvd.code)
                await ends_reach(sidecar, i + 1)
            return codes, broken.handshakes
    try:
        codes, handshakes = run(body())
        counted = {o: metric(sidecar, "conduit_upstream_attempts_total", deployment="broken",
                             outcome=o, provider="gemini") or 0.0 for o in ("ok", "early_close")}
    finally:
        sidecar.stop()
    assert (codes, handshakes) == ([1011, 1011], 2)
    assert counted == {"ok": 2, "early_close": 0}


class AtOnce(Refusing):
    """Answers the upgrade with its 101 and `after` at once, then waits for the sidecar
    to let go; with `after` None it closes its connection right after the 101."""

    def __init__(self, after: bytes | None):
        super().__init__("")
        self.after = after

    async def handle(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        writer.write(switching_protocols(head) + (self.after or b""))
        if self.after is not None:
            await reader.read()
        writer.close()


def _close(code: int) -> bytes:
    return bytes([0x88, 2]) + code.to_bytes(2, "big")


@pytest.mark.parametrize("provider, after, counted", [
    ("p", bytes([0xC1, 0]), True),               # a frame with reserved bits: the sidecar closes it
    ("p", _close(1007), True),                   # its data found inconsistent: our request (the key)
    ("p", _close(1008), False),                  # a policy refusal: of what the client asked, maybe
    ("deepgram_agent", None, True),              # its connection closed before its Welcome
    ("deepgram_agent", bytes([0xC1, 0]), True),  # a protocol break for a Welcome
    ("deepgram_agent", _close(1011), True),
    ("deepgram_agent", _close(1008), False),
    ("deepgram_agent", b"", True),               # no Welcome within handshake_timeout_seconds
], ids=["break", "1007", "1008", "greeting-lost", "greeting-break", "greeting-1011", "greeting-1008",
        "greeting-silent"])
def test_a_provider_that_fails_a_session_at_once_is_judged_by_what_it_did(workdir, provider, after, counted):
    """Early closes the circuit did not count (`failures = 1`): a protocol break right
    after the 101 (the sidecar, not the provider, closed the session), a close with
    1007 at once, and a Deepgram agent that failed while its Welcome was awaited (the
    relay not yet started: judged a good connect), or never sent it. Each is the deployment's failure
    (`early_close`): the next session goes to the other deployment. A 1008 at once is
    a refusal of what the request asked (ElevenLabs: a model or voice in the URL that
    does not exist), as an HTTP 403 is: no verdict against the deployment, as before."""
    bad, good = AtOnce(after), Named("good")
    config = deployments(f'name = "bad"\n{ws_url(bad.port)}', f'name = "good"\n{ws_url(good.port)}',
                         extra='secret_env = "PROVIDER_KEY"\n') + "[circuit]\nfailures = 1\ncooldown_seconds = 60\n"
    sidecar = SidecarProcess(workdir, config.replace("providers.p", f"providers.{provider}"), standard_keys(),
                             limits="upstream_connect_timeout_seconds = 2\nhandshake_timeout_seconds = 0.5\n").start()
    if provider == "p":
        url, headers = sidecar.url(model="m", provider="p"), sidecar.auth()
    else:
        url = f"ws://127.0.0.1:{sidecar.port}/v1/agent/converse"
        headers = {"Authorization": f"Token {sidecar.keys.plain['good']}"}

    async def session():
        """The deployment that greeted it, or the close it got."""
        async with connect(url, additional_headers=headers, open_timeout=10) as ws:
            try:
                name = json.loads(await ws.recv())["deployment"]
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else 1006
            ws.transport.abort()  # (a close while the agent's Settings is awaited lingers)
            return name

    async def body():
        async with bad, good:
            first = await session()
            if provider == "p":
                await ends_reach(sidecar, 1)                # judged at its end
            return first, await session()
    try:
        first, then = run(body())
        outcomes = {o: metric(sidecar, "conduit_upstream_attempts_total", deployment="bad", outcome=o,
                              provider=provider) or 0 for o in ("ok", "early_close")}
    finally:
        sidecar.stop()
    assert first != "good" and bad.requests == (1 if counted else 2)
    assert then == ("good" if counted else first)           # without: bad asked again
    assert outcomes == ({"ok": 0, "early_close": 1} if counted else {"ok": 2, "early_close": 0})

def _health(failures=3, cooldown=2.0, cap=5.0) -> Health:
    from conduit_sidecar.config import Circuit
    from conduit_sidecar.routing import Target
    return Health(Target("p", "0", config_mod.Provider(url="ws://h/"), 1),
                  Circuit(failures=failures, cooldown_seconds=cooldown,
                          max_cooldown_seconds=cap))


def test_circuit_rules():
    h = _health()
    for t in range(3):
        assert h.available(t)
        h.begin()
        h.failed(t)
    assert not h.healthy and not h.available(3.0) and h.available(4.0)   # rests 2 s from t=2
    assert h.begin()                            # the one probe
    assert not h.available(4.0)                 # nobody else while it is under way
    h.failed(4.0, probe=True)
    assert h.resting_until == 8.0               # doubled
    for t in (8.0, 16.0):
        h.failed(t, probe=h.begin())
    assert h.resting_until == 16.0 + 5.0        # capped
    h.begin()
    h.succeeded()
    assert h.healthy and h.available(21.0) and h.cooldown == 2.0 and h.failures == 0
    h.begin()
    h.failed(30.0, rest=1.5)                    # Retry-After, even after one failure
    assert h.resting_until == 31.5
    assert h.live == 1                          # the one session that connected
    h.abandoned(h.begin())                      # the probe's client left: no verdict, none held
    assert h.available(31.5) and h.live == 1
    h.release()
    assert h.live == 0



def test_an_attempts_deadline_turns_only_its_own_cancellation_into_a_timeout():
    """upstream._Deadline, as _attempt uses it: its time up is TimeoutError; the
    client leaving first stays a cancellation (not a timeout charged to the
    deployment); an error of the attempt's own stays that error; a block left in time
    is not cancelled later."""
    from conduit_sidecar.upstream import _Deadline

    async def timed(seconds: float, work) -> None:
        deadline = _Deadline(asyncio.get_running_loop(), seconds)
        try:
            await work
        except BaseException as exc:
            deadline.end(exc)
            raise
        deadline.end(None)

    async def refused() -> None:
        await asyncio.sleep(0)
        raise ConnectionRefusedError

    async def scenario() -> list[str]:
        never = asyncio.get_running_loop().create_future()
        seen = []
        for seconds, work in ((0.01, never), (5.0, never), (0.0, refused())):
            task = asyncio.ensure_future(timed(seconds, work))
            if seconds == 5.0:
                await asyncio.sleep(0)
                task.cancel()  # the client left
            try:
                await task
            except BaseException as exc:
                seen.append(type(exc).__name__)
        await timed(0.01, asyncio.sleep(0))
        await asyncio.sleep(0.05)  # past its time: nothing cancels this task
        return seen

    assert asyncio.run(scenario()) == ["TimeoutError", "CancelledError", "ConnectionRefusedError"]

def test_only_the_probe_ends_the_probing():
    """An attempt that began before the rest ends during the probe: its verdict is not
    the probe's. Its abandonment let a second probe start, and its failure doubled the
    cool-down."""
    h = _health(failures=1)
    late = h.begin()                            # begun while the circuit was closed
    h.begin()
    h.failed(0.0)                               # another attempt: the circuit rests 2 s
    probe = h.begin() if h.available(2.0) else None
    assert probe is True and late is False
    h.abandoned(late)                           # the late one's client leaves
    assert not h.available(2.5)                 # the probe is still the only one
    h.begin()
    h.failed(2.5, probe=late)                   # a late failure: no doubling
    assert h.cooldown == 2.0
    h.succeeded()
    assert h.healthy and h.available(3.0)


def test_a_probe_that_fails_after_another_attempt_connected_is_one_failure():
    """An attempt begun before the rest connects while the probe is under way: the
    deployment is back, its failures in a row zero. The probe's failure after that was
    still taken as a failed probe: the healthy deployment rested again, for a doubled
    cool-down, on one failure."""
    h = _health(failures=2)
    late = h.begin()                            # begun while the circuit was closed
    for t in (0.0, 0.1):
        h.begin()
        h.failed(t)                             # two in a row: rests 2 s
    probe = h.begin() if h.available(2.5) else None
    assert probe is True and late is False
    h.succeeded()                               # the late attempt connects
    h.failed(3.0, probe=probe)                  # then the probe fails: one failure
    assert h.healthy and h.available(3.0)       # without: resting until 7.0
    assert h.cooldown == 2.0 and h.failures == 1


def test_a_late_verdict_never_cuts_a_rest_short():
    """Attempts begun before a rest may end during it. A 429's `Retry-After: 30` rested
    the deployment 30 s, and a 503 that ended after it set the rest to the cool-down
    (1 s): sessions went back to it within a second of the provider asking for 30 (seen
    on the running sidecar with failures = 1, cooldown_seconds = 1: the next session 1.3 s
    later was sent to it). A late 429 with a shorter Retry-After cut the cool-down short
    as well."""
    h = _health(failures=1, cooldown=1.0, cap=60.0)
    late_503, late_429 = h.begin(), h.begin()
    h.begin()
    h.failed(0.0, rest=30.0)                    # 429, Retry-After: 30
    h.failed(0.5, probe=late_503)               # a 503 begun before it
    assert h.resting_until == 30.0              # without: 1.5
    h.failed(0.6, rest=2.0, probe=late_429)     # a 429, Retry-After: 2, begun before it
    assert h.resting_until == 30.0              # without: 2.6
    h.failed(40.0, rest=2.0, probe=h.begin())   # the probe, past the rest: 429 again
    assert h.resting_until == 42.0


@pytest.mark.parametrize("value, rest", [
    ("2", 2.0), (" 7 ", 7.0), ("2.5", 2.5), ("600", 60.0), ("-5", 0.0), (None, None), ("", None),
    # "nan" once left a deployment resting for good: no clock passes NaN.
    ("nan", None), ("-nan", None), ("inf", None),
    ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),   # a date in the past: at once
])
def test_retry_after_is_a_finite_rest_within_the_cap(value, rest):
    assert _retry_after(value, 60.0) == rest


# -- provider host names ---------------------------------------------------------------

def test_a_provider_host_name_is_looked_up_once_per_dns_cache_seconds(workdir):
    """`localhost` in a provider URL: the first session looks it up, the next ones
    reuse its addresses (sessions that arrive together share one lookup) until
    dns_cache_seconds pass, or until none of them connects; a literal address is
    never looked up."""
    named, literal = Named("named"), Named("literal")
    sidecar = SidecarProcess(
        workdir,
        f'[providers.p]\nurl = "ws://localhost:{named.port}/"\n'
        f'[providers.lit]\nurl = "ws://127.0.0.1:{literal.port}/"\n',
        standard_keys(), limits="upstream_connect_timeout_seconds = 2\ndns_cache_seconds = 2\n").start()

    def lookups() -> float:
        return metric(sidecar, "conduit_upstream_dns_lookups_total", result="ok") or 0.0

    async def body():
        counts = []
        async with named, literal:
            seen = [await served_by(sidecar) for _ in range(3)]
            counts.append(lookups())
            seen += [await served_by(sidecar, "lit"), await served_by(sidecar, "lit")]
            counts.append(lookups())
            await asyncio.sleep(2.2)  # the addresses expire
            seen += await asyncio.gather(*(served_by(sidecar) for _ in range(5)))
            counts.append(lookups())
        down = await close_of(sidecar)  # cached addresses, nobody there: forgotten
        async with Named("named", named.port):
            seen.append(await served_by(sidecar))
        counts.append(lookups())
        return seen, counts, down, metric(sidecar, "conduit_upstream_dns_lookups_total", result="error")

    try:
        seen, counts, down, failed = run(body())
    finally:
        sidecar.stop()
    assert seen == ["named"] * 3 + ["literal"] * 2 + ["named"] * 6
    assert counts == [1, 1, 2, 3]
    assert down[0] == 1014 and failed is None


def test_a_host_name_that_cannot_be_looked_up_gives_1014_and_is_looked_up_again(workdir):
    """`a..b` fails in the resolver's IDNA step, locally (no query leaves the host):
    each session is refused 1014 with the reason, none is an internal error, and a
    failed lookup is not kept."""
    sidecar = SidecarProcess(workdir, '[providers.p]\nurl = "ws://a..b:1/"\n', standard_keys(),
                             limits="upstream_connect_timeout_seconds = 2\n").start()

    async def body():
        closes = [await close_of(sidecar), await close_of(sidecar)]
        return closes, metric(sidecar, "conduit_upstream_dns_lookups_total", result="error")

    try:
        closes, failed = run(body())
    finally:
        sidecar.stop()
    assert closes == [(1014, "upstream unreachable: invalid host name")] * 2
    assert failed == 2
    assert not [line for line in sidecar.log_lines() if line.get("event") == "internal_error"]


async def settled_descriptors(pid: int) -> int:
    """How many descriptors the process has open, once the count has held for 0.2 s:
    one still closing when counted (the last call's connection, the start's admin
    probe), which a loaded machine's sidecar may close late, would leave one more free
    than the test means to."""
    count, since, deadline = -1, 0.0, time.monotonic() + 5
    while time.monotonic() < deadline:
        now = len(os.listdir(f"/proc/{pid}/fd"))
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.2:
            break
        await asyncio.sleep(0.02)
    return count


def test_a_lookup_failed_for_want_of_a_descriptor_rests_no_deployment(workdir):
    """Out of descriptors (the client's connection took the last), the lookup of a
    provider's name can neither read /etc/hosts nor ask a name server, and glibc says
    the name does not exist (EAI_NONAME, even for `localhost`): it counted as the
    deployment's `tcp` failure, which (`failures = 1`) rested a healthy provider for
    every session after it. It is the sidecar's (`local`), as a socket it cannot make."""
    named = Named("named")
    sidecar = SidecarProcess(workdir, f'[providers.p]\nurl = "ws://localhost:{named.port}/"\n',
                             standard_keys(), extra="[circuit]\nfailures = 1\ncooldown_seconds = 60\n",
                             limits="upstream_connect_timeout_seconds = 2\n").start()
    pid = sidecar.proc.pid

    async def body():
        async with named:
            _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            for _ in range(5):  # a descriptor still closing when counted leaves one more free
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (await settled_descriptors(pid) + 1, hard))
                try:
                    # (once in about twenty runs under load no answer came at all; why was
                    # not found: perhaps a descriptor the sidecar opened meanwhile)
                    starved = await asyncio.wait_for(close_of(sidecar), 10)
                except asyncio.TimeoutError:
                    starved = (0, "no answer")
                    continue
                finally:
                    resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
                if starved[0] != 1000:
                    break
            return starved, await served_by(sidecar)
    try:
        starved, then = run(body())
    finally:
        sidecar.stop()
    assert starved == (1014, "sidecar out of resources: Too many open files")  # without: Name or service not known
    assert then == "named"                                  # without: 1014 `upstream failed: p/0 resting`
    attempts = [a["outcome"] for a in sidecar.log_lines() if a.get("event") == "upstream_attempt"]
    assert attempts == ["local"]


def in_a_network_of_its_own(fn):
    """fn() in a thread of its own network namespace (its loopback up): what it starts
    (servers, the sidecar's process) is there, apart from the host's ports. Skipped
    where namespaces cannot be made (not root)."""
    import ctypes
    import threading
    outcome: list = []

    def thread():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET, for this thread (and its children)
            outcome.append(OSError(ctypes.get_errno(), "unshare"))
            return
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)
    worker = threading.Thread(target=thread)
    worker.start()
    worker.join()
    if isinstance(outcome[0], OSError) and outcome[0].strerror == "unshare":
        pytest.skip(f"no network namespace: {outcome[0]}")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def test_no_local_port_left_for_a_provider_rests_no_deployment(workdir):
    """Out of ephemeral ports (the namespace's range cut to two, both taken by sessions
    to the provider), the next connect fails with EADDRNOTAVAIL: it counted as the
    deployment's `tcp` failure (`upstream unreachable: Cannot assign requested address`)
    and (`failures = 1`) rested a healthy provider for every session after it, though
    ports were free again at once. The pod's ports are the sidecar's (`local`)."""
    def test():
        named = Named("named")
        sidecar = sidecar_with(workdir, deployments(f'name = "named"\n{ws_url(named.port)}'),
                               extra="[circuit]\nfailures = 1\ncooldown_seconds = 60\n")
        held = {named.port, sidecar.port, sidecar.admin_port}
        low = next(p for p in range(40000, 41000) if not {p, p + 1} & held)
        with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:  # the namespace's own
            f.write(f"{low} {low + 1}")

        opened: list = []

        async def session():  # from a port of its own, outside the range
            sock = socket.socket()
            sock.bind(("127.0.0.1", low + 100 + len(opened)))
            sock.connect(("127.0.0.1", sidecar.port))
            ws = await connect(sidecar.url(model="m", provider="p"), sock=sock,
                               additional_headers=sidecar.auth(), open_timeout=10)
            opened.append(ws)
            try:
                return json.loads(await ws.recv())["deployment"]
            except ConnectionClosed as exc:
                return exc.rcvd.code, exc.rcvd.reason

        async def body():
            async with named:
                served = [await session(), await session()]     # the two ports taken
                starved = await session()
                with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
                    f.write("32768 60999")                      # ports free again
                return served, starved, await session()
        try:
            return run(body()), [a["outcome"] for a in sidecar.log_lines() if a.get("event") == "upstream_attempt"]
        finally:
            sidecar.stop()
    (served, starved, then), attempts = in_a_network_of_its_own(test)
    assert served == ["named", "named"]
    assert starved == (1014, "sidecar out of resources: Cannot assign requested address")
    assert then == "named"                                  # without: 1014 `upstream failed: p/named resting`
    assert attempts == ["local"]

_DNS_DOWN_AFTER_ONE = """
import socket, sys
from conduit_sidecar.resolver import Resolver

real, calls = Resolver._lookup, [0]
async def lookup(self, host, port):  # DNS answers once, then is down
    calls[0] += 1
    if calls[0] > 1:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    return await real(self, host, port)
Resolver._lookup = lookup
from conduit_sidecar.cli import main
sys.exit(main())
"""


def test_when_dns_fails_the_last_good_addresses_serve_until_they_stop_connecting(workdir):
    """DNS down after the first lookup (injected in the process: this machine cannot
    make a name fail on demand): past dns_cache_seconds, sessions go on with the last
    good addresses while the lookups in the background fail; once those addresses
    stop taking connections they are dropped, and a session that must wait for a
    lookup gets 1014 with the resolver's words."""
    named = Named("named")
    sidecar = SidecarProcess(workdir, f'[providers.p]\nurl = "ws://localhost:{named.port}/"\n',
                             standard_keys(), limits="upstream_connect_timeout_seconds = 2\n"
                             "dns_cache_seconds = 1\n")
    sidecar.argv = [sys.executable, "-c", _DNS_DOWN_AFTER_ONE, *sidecar.argv[3:]]
    sidecar.start()

    async def body():
        async with named:
            seen = [await served_by(sidecar)]
            for _ in range(2):
                await asyncio.sleep(1.2)  # past the limit, and past the retry
                seen.append(await served_by(sidecar))
            await asyncio.sleep(0.3)
        counts = [metric(sidecar, "conduit_upstream_dns_lookups_total", result=r) for r in ("ok", "error")]
        refused = await close_of(sidecar)      # the addresses stopped connecting: dropped
        unresolved = await close_of(sidecar)   # a lookup to wait for, and DNS is down
        return seen, counts, refused, unresolved

    try:
        seen, counts, refused, unresolved = run(body())
    finally:
        sidecar.stop()
    assert seen == ["named"] * 3
    assert counts == [1, 2]
    assert refused == (1014, "upstream refused the connection")
    assert unresolved == (1014, "upstream unreachable: Temporary failure in name resolution")


_DNS_SLOWER_THAN_THE_CONNECT_TIMEOUT = """
import asyncio, sys
from conduit_sidecar.resolver import Resolver

real = Resolver._lookup
async def lookup(self, host, port):  # a resolver that answers, after 1.5 s
    await asyncio.sleep(1.5)
    return await real(self, host, port)
Resolver._lookup = lookup
from conduit_sidecar.cli import main
sys.exit(main())
"""


def test_a_lookup_slower_than_the_connect_timeout_serves_the_next_session(workdir):
    """DNS that answers, but after the connect timeout (injected in the process: a
    Kubernetes pod's `ndots:5` tries each search domain first). The session that waited
    times out; the lookup goes on, and its addresses serve the next session. The
    timeout dropped the host's entry with its lookup under way: the lookup's answer was
    lost, each session started a lookup of its own and timed out in it, so a provider
    whose name takes longer to look up than the timeout was never reached."""
    named = Named("named")
    sidecar = SidecarProcess(workdir, f'[providers.p]\nurl = "ws://localhost:{named.port}/"\n',
                             standard_keys(), limits="upstream_connect_timeout_seconds = 1\n")
    sidecar.argv = [sys.executable, "-c", _DNS_SLOWER_THAN_THE_CONNECT_TIMEOUT, *sidecar.argv[3:]]
    sidecar.start()

    def lookups() -> float:
        return metric(sidecar, "conduit_upstream_dns_lookups_total", result="ok") or 0.0

    async def body():
        async with named:
            first = await close_of(sidecar)
            while not lookups():                # the lookup it waited for answers
                await asyncio.sleep(0.05)
            return first, await served_by(sidecar), lookups()
    try:
        first, served, looked_up = run(body())
    finally:
        sidecar.stop()
    assert first == (1014, "upstream timed out (TCP connect)")
    assert served == "named"                    # without: 1014, timed out in a lookup of its own
    assert looked_up == 1


# -- 5. a model route from openai to azure, with the OpenAI SDK -------------------------

def test_model_route_falls_from_openai_to_azure_with_the_openai_sdk(workdir):
    from test_openai_sdk import sdk_session

    openai = Refusing("503 Service Unavailable")
    mock_port = held_port()
    sidecar = sidecar_with(workdir, f"""
        [providers.openai]
        url = "ws://127.0.0.1:{openai.port}/v1/realtime?model={{model}}"
        secret_env = "PROVIDER_KEY"

        [providers.azure]
        secret_env = "PROVIDER_KEY"
        [[providers.azure.deployments]]
        name = "eastus2"
        url = "ws://127.0.0.1:{mock_port}/openai/v1/realtime?model={{model}}"
        model_names = {{ "gpt-realtime*" = "contoso-realtime" }}

        [routes]
        "gpt-realtime*" = ["openai", "azure"]
        """)

    async def body():
        async with openai, MockProvider(port=mock_port) as azure:
            seen = await sdk_session(sidecar.port, sidecar.keys.plain["good"], "gpt-realtime")
            await ends_reach(sidecar, 1)
            return seen, openai.requests, azure.requests
    try:
        seen, openai_requests, azure_requests = run(body())
    finally:
        sidecar.stop()
    assert seen == ["response.output_audio.delta", "response.done"]
    assert openai_requests == 1
    (path, headers), = azure_requests
    assert path == "/openai/v1/realtime?model=contoso-realtime"
    assert headers["api-key"] == PROVIDER_SECRET and "Authorization" not in headers
    end, = ended(sidecar)
    assert (end["provider"], end["deployment"], end["model"]) == ("azure", "eastus2", "gpt-realtime")


def test_a_model_route_never_falls_to_a_provider_the_key_does_not_allow(workdir):
    """allowed_providers holds for the providers a model route fails over to: a key
    allowed only the first gets 1014 when it fails, never a session at the next."""
    first, second = Refusing("503 Service Unavailable"), Named("second")
    keys = standard_keys()
    keys.add("first-only", allowed_providers=["first"])
    sidecar = SidecarProcess(workdir, f"""
        [providers.first]
        {ws_url(first.port)}
        [providers.second]
        {ws_url(second.port)}
        [routes]
        "m-*" = ["first", "second"]
        """, keys).start()

    async def body():
        async with first, second:
            async with connect(sidecar.url(model="m-1", provider=None),
                               additional_headers=sidecar.auth("first-only"), open_timeout=10) as ws:
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
            return ws.close_code, first.requests, second.handshakes
    try:
        code, asked_first, asked_second = run(body())
    finally:
        sidecar.stop()
    assert (code, asked_first, asked_second) == (1014, 1, 0)


# -- 6. ElevenLabs' signed URLs: one deployment signs, the same one serves -------------

def _elevenlabs(*ports: int) -> str:
    body = "".join(f"""
        [[providers.elevenlabs.deployments]]
        name = "{name}"
        url = "ws://127.0.0.1:{port}/v1/convai/conversation?agent_id={{model}}"
        """ for name, port in zip("ab", ports))
    return f"""
        [providers.elevenlabs]
        secret_env = "PROVIDER_KEY"
        selection = "least_sessions"
        """ + body


def test_a_public_agents_refusal_neither_rests_its_deployment_nor_fails_over(workdir):
    """A key-less session (a public agent) refused with 401: the agent is not public,
    which says nothing of the deployment. Anyone could otherwise rest every deployment
    (401 rests at once) without presenting any credential."""
    refusing, other = Refusing("401 Unauthorized"), Named("b")
    keys = standard_keys()
    keys.add("owner", public_agents=["agent_pub"])
    sidecar = SidecarProcess(workdir, f"""
        [providers.elevenlabs]
        secret_env = "PROVIDER_KEY"
        selection = "least_sessions"
        [[providers.elevenlabs.deployments]]
        name = "a"
        url = "ws://127.0.0.1:{refusing.port}/v1/convai/conversation?agent_id={{model}}"
        [[providers.elevenlabs.deployments]]
        name = "b"
        url = "ws://127.0.0.1:{other.port}/v1/convai/conversation?agent_id={{model}}"
        """, keys).start()

    async def body():
        async with refusing, other:
            async with connect(f"ws://127.0.0.1:{sidecar.port}/v1/convai/conversation?agent_id=agent_pub",
                               open_timeout=10) as ws:
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
            return (ws.close_code, ws.close_reason), refusing.requests, other.handshakes
    try:
        close, asked_a, asked_b = run(body())
        healthy = metric(sidecar, "conduit_deployment_healthy", deployment="a", provider="elevenlabs")
    finally:
        sidecar.stop()
    assert (close, asked_a, asked_b, healthy) == ((1014, "upstream refused: HTTP 401"), 1, 0, 1)


async def _signed_url(sidecar, agent: str = "agent_private", more: str = "") -> tuple[int, dict | str]:
    """The sidecar's answer to the SDK's get-signed-url call (its JSON, or its text)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{sidecar.port}/v1/convai/conversation/get-signed-url?agent_id={agent}{more}",
        headers={"xi-api-key": sidecar.keys.plain["good"]})

    def fetch():
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            return exc.code, json.loads(body) if body.startswith(b"{") else body.decode()
    return await asyncio.to_thread(fetch)


async def _talk(url: str, **kw) -> str:
    async with connect(url, open_timeout=10, **kw) as ws:
        await ws.send('{"type":"conversation_initiation_client_data"}')
        return json.loads(await ws.recv())["type"]


def test_a_signed_url_caller_that_resets_as_the_provider_answers_is_not_our_bug(workdir):
    """The client resets as the provider's signed URL comes back (a moment after, by
    0-2 ms, a hundred times). Its connection_lost cancels the call, but asyncio.wait_for
    (Python 3.11) returns an answer that was in and drops a cancellation that came
    with it: the answer was written to the closed transport, which raised, and the
    call was logged as a bug of ours with its traceback and counted as internal_error
    as well as a signed URL."""
    import random
    import struct
    port = held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(port))
    key = sidecar.keys.plain["good"]
    signed = json.dumps({"signed_url": f"wss://127.0.0.1:{port}/v1/convai/conversation?agent_id=a"
                                       "&conversation_signature=s"}).encode()
    asked: asyncio.Queue = asyncio.Queue()
    rounds = 100

    async def provider(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        answer = asyncio.get_running_loop().create_future()
        asked.put_nowait(answer)
        await answer
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(signed), signed))
        writer.close()

    async def body():
        server = await asyncio.start_server(provider, "127.0.0.1", port)
        try:
            for _ in range(rounds):
                reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
                writer.write(f"GET /v1/convai/conversation/get-signed-url?agent_id=a HTTP/1.1\r\n"
                             f"Host: 127.0.0.1\r\nxi-api-key: {key}\r\n\r\n".encode())
                answer = await asyncio.wait_for(asked.get(), 10)
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                answer.set_result(None)
                await asyncio.sleep(random.random() * 0.002)
                writer.transport.abort()                        # a reset
        finally:
            server.close()
    try:
        run(body())
        output = sidecar.output()
        errors = total(sidecar, 'conduit_connections_total{result="internal_error"}')
    finally:
        sidecar.stop()
    assert errors == 0 and "internal_error" not in output


def test_a_signed_url_call_with_two_different_keys_is_refused_saying_so(workdir):
    """Two xi-api-key headers holding different keys: which one would the session be
    charged to? Neither, and the answer says why (it said `missing key`, as for none,
    and refused the same key given twice, which a session's handshake takes)."""
    sidecar = sidecar_with(workdir, _elevenlabs(held_port(), held_port()))
    key = sidecar.keys.plain["good"]

    def answer(second: str) -> bytes:
        request = (f"GET /v1/convai/conversation/get-signed-url?agent_id=agent_x HTTP/1.1\r\n"
                   f"Host: 127.0.0.1:{sidecar.port}\r\nxi-api-key: {key}\r\nxi-api-key: {second}\r\n\r\n")
        with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as s:
            s.sendall(request.encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data
    try:
        different, same = answer("condt_" + "x" * 43), answer(key)
    finally:
        sidecar.stop()
    assert different.startswith(b"HTTP/1.1 401 ") and different.endswith(b'{"detail":"two different keys"}'), different
    assert same.startswith(b"HTTP/1.1 502 "), same        # admitted: no deployment is up


def test_a_signed_url_is_fetched_from_the_next_deployment_when_one_is_down(workdir):
    down, up = held_port(), held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(down, up))

    async def body():
        async with MockProvider(port=up, shape="elevenlabs") as b:
            status, answer = await _signed_url(sidecar)
            assert status == 200, answer
            return await _talk(answer["signed_url"]), b.issued, b.requests
    try:
        first, issued, requests = run(body())
    finally:
        sidecar.stop()
    assert first == "conversation_initiation_metadata"
    assert len(issued) == 1 and any(sig in requests[-1][0] for sig in issued)
    end, = ended(sidecar)
    assert (end["provider"], end["deployment"], end["key_id"]) == ("elevenlabs", "b", "good")


_KNOWN_TO_THE_RESOLVER_ONLY = """
import socket, sys
from conduit_sidecar.resolver import Resolver

real_lookup, real_getaddrinfo = Resolver._lookup, socket.getaddrinfo
async def lookup(self, host, port):  # the sidecar's resolver knows provider.test
    return await real_lookup(self, "127.0.0.1" if host == "provider.test" else host, port)
def getaddrinfo(host, *args, **kwargs):  # a lookup of the process's own does not (none leaves)
    if host == "provider.test":
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return real_getaddrinfo(host, *args, **kwargs)
Resolver._lookup, socket.getaddrinfo = lookup, getaddrinfo
from conduit_sidecar.cli import main
sys.exit(main())
"""


def test_the_signed_url_fetch_takes_the_host_names_addresses_from_the_sessions_resolver(workdir):
    """A deployment named by host name: the get-signed-url fetch looked the name up
    itself on every call (urllib in its thread), outside the resolver whose addresses
    the WebSocket legs share (counted, kept for dns_cache_seconds, the last good kept
    when DNS fails, dropped when they stop connecting). A name only that resolver
    answers (injected in the process) shows it: the calls got 502 `unreachable`. Now
    two calls and the session they sign make one lookup."""
    port = held_port()
    sidecar = SidecarProcess(workdir, _elevenlabs(port).replace("127.0.0.1", "provider.test"),
                             standard_keys(), limits="upstream_connect_timeout_seconds = 2\n")
    sidecar.argv = [sys.executable, "-c", _KNOWN_TO_THE_RESOLVER_ONLY, *sidecar.argv[3:]]
    sidecar.start()

    async def body():
        async with MockProvider(port=port, shape="elevenlabs"):
            answers = [await _signed_url(sidecar), await _signed_url(sidecar)]
            assert [status for status, _ in answers] == [200, 200], answers   # without: 502
            return await _talk(answers[1][1]["signed_url"])
    try:
        first = run(body())
        lookups = metric(sidecar, "conduit_upstream_dns_lookups_total", result="ok")
    finally:
        sidecar.stop()
    assert first == "conversation_initiation_metadata"
    assert lookups == 1

def test_the_signed_url_call_passes_the_sdks_agent_parameters(workdir):
    """ElevenLabs' SDK asks for an environment, branch or version of the agent and for
    the conversation id; only agent_id went to the provider, so a staging conversation
    ran on production. Parameters outside that list still never go, nor does one given
    twice (which of the two counts would be the provider's parser's choice)."""
    port = held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(port))

    async def body():
        async with MockProvider(port=port, shape="elevenlabs") as m:
            status, answer = await _signed_url(
                sidecar, more="&environment=staging&branch_id=b1&include_conversation_id=true"
                              "&callback=http%3A%2F%2Fevil&version_id=v1&version_id=v2")
            return status, m.requests
    try:
        status, requests = run(body())
    finally:
        sidecar.stop()
    assert status == 200
    path = [p for p, _ in requests if "get-signed-url" in p][-1]
    assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query)) == {
        "agent_id": "agent_private", "environment": "staging", "branch_id": "b1",
        "include_conversation_id": "true"}


def test_the_signed_url_call_is_answered_after_the_client_ends_its_side_and_never_forwards_a_key(workdir):
    """An HTTP client may end its side once its request is sent (curl, ncat): the
    call is still answered (reading on while the provider is asked had made it
    cancel). A virtual key in a parameter that goes to the provider is refused (400)
    and never sent."""
    port = held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(port))
    key = sidecar.keys.plain["good"]

    async def ask(query: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(f"GET /v1/convai/conversation/get-signed-url?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"xi-api-key: {key}\r\n\r\n".encode())
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer

    async def body():
        async with MockProvider(port=port, shape="elevenlabs") as m:
            signed = await ask("agent_id=agent_private")
            leaked = await ask(f"agent_id=agent_private&branch_id={key}")
            return signed, leaked, m.requests
    try:
        signed, leaked, requests = run(body())
    finally:
        sidecar.stop()
    assert signed.startswith(b"HTTP/1.1 200 ") and b"signed_url" in signed
    assert leaked.startswith(b"HTTP/1.1 400 ") and key.encode() not in leaked
    assert len([p for p, _ in requests if "get-signed-url" in p]) == 1
    assert not any(key in p for p, _ in requests)


def test_a_signed_url_ends_with_its_key_when_the_key_is_rotated(workdir):
    """The key `good` signs, then is rotated under the same id (a new sha256): the
    signature is refused as its old key now is (4001 key revoked). It stood for the
    key's id, so a leaked key could sign just before its rotation and go on opening
    sessions, billed to the new key, for the signature's 15 minutes."""
    port = held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(port))

    async def body():
        async with MockProvider(port=port, shape="elevenlabs"):
            status, answer = await _signed_url(sidecar)
            assert status == 200, answer
            entry = next(e for e in sidecar.keys.entries if e["id"] == "good")
            entry["sha256"] = hash_key(new_key())
            sidecar.keys.write(sidecar.keys_file)
            deadline = time.monotonic() + 5                         # polled every 0.2 s
            while not await asyncio.to_thread(total, sidecar, 'conduit_keys_reload_total{result="ok"}'):
                assert time.monotonic() < deadline, "the key file was not reloaded"
                await asyncio.sleep(0.05)
            with pytest.raises(ConnectionClosed) as closed:
                await _talk(answer["signed_url"])
            return closed.value.rcvd
    try:
        rcvd = run(body())
    finally:
        sidecar.stop()
    assert (rcvd.code, rcvd.reason) == (4001, "key revoked")


@pytest.mark.parametrize("status, moves_on, outcome", [("503 Service Unavailable", True, "http_5xx"),
                                                        ("401 Unauthorized", True, "http_auth"),
                                                        ("403 Forbidden", True, "http_403"),
                                                        ("garbage", True, "invalid"),
                                                        ("301 Moved Permanently", True, "http_3xx"),
                                                        ("404 Not Found", False, "http_other")])
def test_the_signed_url_fetch_moves_on_as_a_session_connect_does(workdir, status, moves_on, outcome):
    """A 5xx, 401, 403 or 3xx from the first deployment (the redirect not followed: the
    secret would go where it says), or an answer that is not HTTP (a status line
    "HTTP/1.1 garbage"): the next one signs. Any other 4xx is the request's
    own fault (an unknown agent): the fetch stops there, with its status. Only the 401
    rests the first one at once (a 403 may answer the agent asked for). Each attempt is
    in conduit_upstream_attempts_total and the failed one in an upstream_attempt line,
    as a session's connect attempts are (they were not: a deployment could rest with
    no failure counted or logged)."""
    elsewhere = Refusing("200 OK")
    first = Refusing(status, f"Location: http://127.0.0.1:{elsewhere.port}/\r\n" if status[0] == "3" else "")
    second = held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(first.port, second))

    async def body():
        async with first, elsewhere, MockProvider(port=second, shape="elevenlabs") as b:
            answer = await _signed_url(sidecar)
            assert elsewhere.requests == 0  # a redirect is never followed
            return answer, first.requests, len(b.issued)
    try:
        (code, answer), asked_first, signed_by_second = run(body())
        counted = total(sidecar, f'conduit_signed_urls_total{{status="{code}"}}')
        attempts = {d: metric(sidecar, "conduit_upstream_attempts_total", deployment=d,
                              outcome=o, provider="elevenlabs") for d, o in (("a", outcome), ("b", "ok"))}
        healthy = metric(sidecar, "conduit_deployment_healthy", deployment="a", provider="elevenlabs")
    finally:
        sidecar.stop()
    assert asked_first == 1
    assert counted == 1
    assert healthy == (0 if outcome == "http_auth" else 1)
    assert attempts == {"a": 1, "b": 1 if moves_on else None}
    logged, = [line for line in sidecar.log_lines() if line.get("event") == "upstream_attempt"]
    assert (logged["deployment"], logged["outcome"]) == ("a", outcome)
    assert logged["level"] == ("error" if outcome == "http_auth" else "warning")
    assert PROVIDER_SECRET not in sidecar.output()
    if moves_on:
        assert code == 200 and signed_by_second == 1, answer
    else:
        assert (code, answer) == (502, {"detail": f"provider refused: HTTP {status.split()[0]}"})
        assert signed_by_second == 0


def test_the_signed_url_fetch_moves_on_past_a_deployment_without_its_secret(workdir):
    """The first deployment's secret is missing (a configuration fault): a session's
    connect logs it and tries the next deployment, and so must the signed-URL fetch.
    It answered 500 "provider secret unavailable" while the second could sign."""
    second = held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(held_port(), second).replace(
        'name = "a"', 'name = "a"\n        secret_env = "CONDUIT_TEST_NO_SUCH_SECRET"', 1))

    async def body():
        async with MockProvider(port=second, shape="elevenlabs") as b:
            return await _signed_url(sidecar), len(b.issued)
    try:
        (code, answer), signed_by_second = run(body())
        config = metric(sidecar, "conduit_upstream_attempts_total", deployment="a", outcome="config",
                        provider="elevenlabs")
    finally:
        sidecar.stop()
    assert (code, signed_by_second) == (200, 1), answer
    assert config == 1                  # counted and logged as a session's connect does
    assert any(line.get("outcome") == "config" and line["level"] == "error" for line in sidecar.log_lines())


def config_fault_then_served(sidecar, body, deployment: str) -> tuple[str, float]:
    """Runs `body` (a session another deployment serves), then stops the sidecar:
    the deployment that served it, and the `config` attempts counted for `deployment`.
    A configuration fault is no bug of ours: no `internal_error` line."""
    try:
        name = run(body())
        config = metric(sidecar, "conduit_upstream_attempts_total", deployment=deployment, outcome="config",
                        provider="p")
    finally:
        sidecar.stop()
    assert not [line for line in sidecar.log_lines() if line.get("event") == "internal_error"]
    return name, config


def test_a_secret_file_that_is_not_utf8_is_a_configuration_fault_not_a_bug(workdir):
    """A deployment's secret_file holding bytes that are not UTF-8 (a binary key file, a
    Latin-1 editor): reading it raised UnicodeDecodeError, not the OSError the read
    expected, so every session got 500 and an `internal_error` traceback ('a bug of
    ours'), and the next deployment was never tried. It is the deployment's
    configuration fault, as a missing secret is: counted, logged, and passed over."""
    secret = os.path.join(workdir, "secret")
    with open(secret, "wb") as f:
        f.write(b"sk-\xff\xfe-latin1")
    good = Named("good")
    sidecar = sidecar_with(workdir, deployments(
        f'name = "bad"\n{ws_url(held_port())}\nsecret_file = "{secret}"\n'
        'headers = { Authorization = "Bearer {secret}" }',
        f'name = "good"\n{ws_url(good.port)}'))  # least_sessions: tried in this order

    async def body():
        async with good:
            return await served_by(sidecar)
    assert config_fault_then_served(sidecar, body, "bad") == ("good", 1)


def test_a_secret_a_header_cannot_carry_is_a_configuration_fault_and_a_bom_is_dropped(workdir):
    """A secret file saved with a byte-order mark (Windows Notepad's UTF-8), or holding a
    character past Latin-1 (a typographic quote pasted with the key): HTTP headers are
    written in ISO-8859-1, and the upgrade request's build raised UnicodeEncodeError, a
    500 and an `internal_error` traceback on every session, no other deployment tried.
    The mark is dropped as the file is read; a secret that is not ASCII is the
    deployment's configuration fault, as a missing one is."""
    marked, quoted = os.path.join(workdir, "marked"), os.path.join(workdir, "quoted")
    with open(marked, "wb") as f:
        f.write(b"\xef\xbb\xbfsk-marked\n")
    with open(quoted, "w", encoding="utf-8") as f:
        f.write("sk-\u2019quoted")
    heads = []

    async def record(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        writer.write(switching_protocols(head))
        close = (await short_frame(reader))[2]                  # the client's, forwarded
        writer.write(bytes([0x88, len(close)]) + close)         # answered: no close timeout
        await reader.read()
        writer.close()
    bom_port, good = held_port(), Named("good")
    header = 'headers = { Authorization = "Bearer {secret}" }'
    sidecar = sidecar_with(workdir, deployments(
        f'name = "quoted"\n{ws_url(held_port())}\nsecret_file = "{quoted}"\n{header}',
        f'name = "good"\n{ws_url(good.port)}')
        + f'\n[providers.bom]\n{ws_url(bom_port)}\nsecret_file = "{marked}"\n{header}\n')

    async def body():
        server = await asyncio.start_server(record, "127.0.0.1", bom_port)
        try:
            async with good:
                ws = await connect(sidecar.url(provider="bom", model="m"), additional_headers=sidecar.auth(),
                                   open_timeout=10)
                await ws.close()
                return await served_by(sidecar)
        finally:
            server.close()
    assert config_fault_then_served(sidecar, body, "quoted") == ("good", 1)
    assert b"\r\nAuthorization: Bearer sk-marked\r\n" in heads[0], heads


def test_a_secret_file_that_becomes_unreadable_keeps_the_last_good_secret(workdir):
    """A provider's secret_file that was read once, then vanished (a Secret deleted, a
    key removed from it), or was left empty or holding a character no header can carry
    (an operator's mistake): every new session of that provider got 1011 "provider
    secret unavailable". The last good secret is kept, with one warning per change of
    the file and `conduit_provider_secret_reload_total{result="invalid"}`, and a file readable
    again is used at the next session."""
    secret = os.path.join(workdir, "openai")
    with open(secret, "w") as f:
        f.write("sk-first\n")
    port, sent = held_port(), []

    def record(connection, request):
        sent.append(request.headers["Authorization"])

    async def echo(ws):
        await ws.send(json.dumps({"type": "session.created", "deployment": "only"}))
        async for message in ws:
            await ws.send(message)
    sidecar = sidecar_with(workdir, f'[providers.p]\n{ws_url(port)}\nsecret_file = "{secret}"\n'
                                    'headers = { Authorization = "Bearer {secret}" }\n')

    def replace(text: str | None) -> None:
        if text is None:
            os.remove(secret)
            return
        with open(secret, "w", encoding="utf-8") as f:
            f.write(text)

    async def body():
        async with serve(echo, "127.0.0.1", port, process_request=record, compression=None):
            for text in (None, "\n", "sk-\u2019pasted", None, "sk-second\n"):
                await served_by(sidecar)
                replace(text)
            await served_by(sidecar)
    try:
        run(body())
        reloads = {result: metric(sidecar, "conduit_provider_secret_reload_total", result=result)
                   for result in ("ok", "invalid")}
    finally:
        sidecar.stop()
    assert sent == ["Bearer sk-first"] * 5 + ["Bearer sk-second"]
    assert reloads == {"ok": 1, "invalid": 4}
    warned = [(line["level"], line["result"], line.get("error"))
              for line in sidecar.log_lines() if line.get("event") == "provider_secret_reload"]
    assert warned == [("warning", "invalid", "No such file or directory"),
                      ("warning", "invalid", "empty"),
                      ("warning", "invalid", "a character outside ASCII"),
                      ("warning", "invalid", "No such file or directory"),
                      ("info", "ok", None)]
    assert "sk-first" not in sidecar.output() and "sk-second" not in sidecar.output()


def test_a_deployment_that_keeps_failing_signed_url_calls_rests(workdir):
    """Private agents' sessions go only where their URL was signed, so a deployment that
    is down may see no session attempts at all: its signed-URL failures must trip its
    circuit as a session's would. Each call asked it again (with a blackhole, each
    waited out its share of the connect timeout)."""
    first, second = Refusing("503 Service Unavailable"), held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(first.port, second),
                           extra="[circuit]\nfailures = 2\ncooldown_seconds = 60\n")

    async def body():
        async with first, MockProvider(port=second, shape="elevenlabs") as b:
            answers = [await _signed_url(sidecar) for _ in range(4)]
            return [code for code, _ in answers], first.requests, len(b.issued)
    try:
        codes, asked_first, signed_by_second = run(body())
        healthy = metric(sidecar, "conduit_deployment_healthy", deployment="a", provider="elevenlabs")
        failed = metric(sidecar, "conduit_upstream_attempts_total", deployment="a", outcome="http_5xx",
                        provider="elevenlabs")
    finally:
        sidecar.stop()
    assert codes == [200] * 4 and signed_by_second == 4
    assert asked_first == 2 and healthy == 0
    # The failures that rested it are counted and logged (they were neither).
    assert failed == 2
    logged = [line for line in sidecar.log_lines() if line.get("event") == "upstream_attempt"]
    assert [(line["deployment"], line["outcome"]) for line in logged] == [("a", "http_5xx")] * 2
    assert logged[-1]["resting_seconds"] > 0


def test_a_signed_url_fetch_without_a_descriptor_rests_no_deployment(workdir):
    """With no descriptor left for the fetch's socket (the call's own connection took
    the last), the failure is the sidecar's, as a session's connect is (outcome
    `local`): it counted as `tcp`, failed over to the next deployment, and each
    failure went toward the circuit, which rested healthy deployments for everyone."""
    first, second = held_port(), held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(first, second),
                           extra="[circuit]\nfailures = 1\ncooldown_seconds = 60\n")
    pid = sidecar.proc.pid

    async def body():
        async with MockProvider(port=first, shape="elevenlabs"), MockProvider(port=second, shape="elevenlabs"):
            _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            for _ in range(5):  # a descriptor still closing when counted leaves one more
                # free: the fetch is then made (200); counted again
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (await settled_descriptors(pid) + 1, hard))
                try:
                    starved = await _signed_url(sidecar)
                finally:
                    resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
                if starved[0] != 200:
                    break
            return starved, await _signed_url(sidecar)
    try:
        (code, answer), (then, _) = run(body())
        outcomes = {(d, o): metric(sidecar, "conduit_upstream_attempts_total", deployment=d, outcome=o,
                                   provider="elevenlabs") for d in "ab" for o in ("local", "tcp")}
        healthy = [metric(sidecar, "conduit_deployment_healthy", deployment=d, provider="elevenlabs")
                   for d in "ab"]
    finally:
        sidecar.stop()
    assert (code, answer) == (503, {"detail": "sidecar out of resources: Too many open files"})
    assert sum(n or 0 for n in outcomes.values()) == 1 and not outcomes["a", "tcp"] and not outcomes["b", "tcp"]
    assert healthy == [1, 1] and then == 200


def test_a_signed_url_fetch_from_an_ipv6_deployment_names_its_host_in_brackets(workdir):
    """A deployment at an IPv6 literal (`ws://[::1]:PORT/...`): the get-signed-url call
    was sent with `Host: ::1:PORT`, which is no valid Host header (RFC 7230: an IPv6
    literal in brackets); a provider (or a proxy before it) answers such a request 400."""
    port = held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(port).replace("127.0.0.1", "[::1]"))

    async def body():
        async with MockProvider(host="::1", port=port, shape="elevenlabs") as mock:
            await _signed_url(sidecar)
            return [headers.get("Host") for path, headers in mock.requests if "get-signed-url" in path]
    try:
        hosts = run(body())
    finally:
        sidecar.stop()
    assert hosts == [f"[::1]:{port}"]


def test_a_signed_session_goes_to_the_deployment_that_signed_it(workdir):
    """`a` signs (both idle: listed order). A keyed session then makes `a` the busier,
    so the balancer would send the next session to `b`, which never issued the
    signature: the signed session must still go to `a`, and `b` is neither asked nor
    rested."""
    ports = held_port(), held_port()
    sidecar = sidecar_with(workdir, _elevenlabs(*ports))
    key = {"xi-api-key": sidecar.keys.plain["good"]}

    async def body():
        async with MockProvider(port=ports[0], shape="elevenlabs") as a, \
                MockProvider(port=ports[1], shape="elevenlabs") as b:
            status, answer = await _signed_url(sidecar)
            assert status == 200 and len(a.issued) == 1 and not b.issued, answer
            url = f"ws://127.0.0.1:{sidecar.port}/v1/convai/conversation?agent_id=agent_x"
            async with connect(url, additional_headers=key, open_timeout=10):
                first = await _talk(answer["signed_url"])
            return first, len(a.requests), len(b.requests)
    try:
        first, to_a, to_b = run(body())
        healthy_b = metric(sidecar, "conduit_deployment_healthy", deployment="b", provider="elevenlabs")
    finally:
        sidecar.stop()
    assert first == "conversation_initiation_metadata"
    assert (to_a, to_b) == (3, 0)    # the REST call, the keyed session, the signed one
    assert healthy_b == 1
    assert sorted(e["deployment"] for e in ended(sidecar)) == ["a", "a"]


def test_signed_url_calls_in_progress_take_the_pending_slots(workdir):
    """A key holder cannot have the sidecar call the provider without bound: each
    get-signed-url holds one of the `max_connections` slots until it is answered. With
    2 slots and a deployment that never answers, two calls wait, a third gets 503 at
    once, and the slots come back when the two time out."""
    port = held_port()
    sidecar = SidecarProcess(workdir, _elevenlabs(port), standard_keys(),
                             limits="max_connections = 2\nupstream_connect_timeout_seconds = 2\n").start()

    async def body():
        async with Blackhole(port=port):
            waiting = [asyncio.create_task(_signed_url(sidecar)) for _ in range(2)]
            await asyncio.to_thread(pending_becomes, sidecar, 2)
            pending = await asyncio.to_thread(total, sidecar, "conduit_connections_pending")
            third = await _signed_url(sidecar)
            return pending, third, await asyncio.gather(*waiting)
    try:
        pending, third, waited = run(body())
        pending_becomes(sidecar, 0)
        after = total(sidecar, "conduit_connections_pending")
    finally:
        sidecar.stop()
    assert pending == 2
    assert third == (503, "too many connections in their handshake\n"), third  # without: 502 timed out
    assert [status for status, _ in waited] == [502, 502]
    assert all(answer["detail"] == "provider timed out" for _, answer in waited), waited
    assert after == 0


@pytest.mark.parametrize("held", [False, True], ids=["running", "held-up"])
def test_a_signed_url_call_in_progress_at_sigterm_gets_its_answer(workdir, held):
    """SIGTERM while a get-signed-url call waits for a deployment that never answers
    (no session open: the sidecar stops at once). The call was cut without an answer
    (the client saw the connection close with no status); it now gets its 502 when the
    connect timeout ends, and the sidecar exits 0 after it. `held`: the sidecar is
    stopped (as a loaded machine may hold it up) until past that timeout. The stop's
    own wait for the call, as long, ran out in the same loop turn as the call's
    timeout, and before the call answered: cut again."""
    port = held_port()
    sidecar = SidecarProcess(workdir, _elevenlabs(port), standard_keys(),
                             limits="upstream_connect_timeout_seconds = 2\n").start()

    async def body():
        async with Blackhole(port=port) as blackhole:
            call = asyncio.create_task(_signed_url(sidecar))
            while not blackhole.requests:
                await asyncio.sleep(0.02)
            sidecar.proc.send_signal(signal.SIGTERM)
            while not any(line.get("event") == "drain" for line in sidecar.log_lines()):
                await asyncio.sleep(0.02)
            # A call made now gets a URL no session can use here (1013): refused.
            late = await _signed_url(sidecar)
            if held:
                sidecar.proc.send_signal(signal.SIGSTOP)
                await asyncio.sleep(2.2)
                sidecar.proc.send_signal(signal.SIGCONT)
            return await call, late
    try:
        (status, answer), late = run(body())
        assert sidecar.proc.wait(10) == 0
    finally:
        sidecar.stop()
    assert (status, answer) == (502, {"detail": "provider timed out"})
    assert late == (503, {"detail": "sidecar is draining: try again later"})


def test_a_second_signal_does_not_wait_for_a_signed_url_call(workdir):
    """A second signal stops at once: the get-signed-url call waiting for a deployment
    that never answers is not waited for. Its fetch ran on in an executor thread,
    which the interpreter joined at exit: the sidecar stayed until the connect timeout
    (a minute here)."""
    port = held_port()
    sidecar = SidecarProcess(workdir, _elevenlabs(port), standard_keys(),
                             limits="upstream_connect_timeout_seconds = 60\n").start()

    async def body():
        async with Blackhole(port=port) as blackhole:
            call = asyncio.create_task(_signed_url(sidecar))
            while not blackhole.requests:
                await asyncio.sleep(0.02)
            sidecar.proc.send_signal(signal.SIGTERM)
            sidecar.proc.send_signal(signal.SIGINT)
            code = await asyncio.to_thread(sidecar.proc.wait, 20)
            call.cancel()
            return code
    try:
        assert run(body(), timeout=30) == 0
    finally:
        sidecar.stop()


# -- config --------------------------------------------------------------------------

def _load(workdir, text: str):
    path = os.path.join(workdir, "c.toml")
    with open(path, "w") as f:
        f.write(text)
    return Router(config_mod.load(path, environ={}), environ={})


@pytest.mark.parametrize("text, error", [
    ('[providers.p]\nurl = "ws://h/"\n[[providers.p.deployments]]\nname = "a"\n'
     '[[providers.p.deployments]]\nname = "a"\n', "deployment names must be unique"),
    ('[providers.p]\nurl = "ws://h/"\n[[providers.p.deployments]]\nname = "1"\n'
     '[[providers.p.deployments]]\n', "deployment names must be unique"),
    ('[providers.p]\nurl = "ws://h/"\n[[providers.p.deployments]]\nweight = 0\n',
     "Expected `int` >= 1 - at `$.providers.p.deployments[0].weight`"),
    ('[providers.p]\nurl = "ws://h/"\n[[providers.p.deployments]]\nregion = "x"\n',
     "Object contains unknown field `region` - at `$.providers.p.deployments[0]`"),
    ('[providers.p]\nurl = "ws://h/"\nselection = "random"\n', "Invalid enum value 'random' - at `$.providers.p.selection`"),
    ('[providers.azure]\nsecret_env = "K"\n[[providers.azure.deployments]]\nresource = "a"\n'
     '[[providers.azure.deployments]]\nsecret_env = "K2"\n',
     "provider 'azure' needs resource - at `$.providers.azure.deployments[1].resource`"),
    ('[providers.p]\nurl = "ws://h/?k={secret}"\n[[providers.p.deployments]]\n',
     "provider 'p' needs secret_file or secret_env - at `$.providers.p.deployments[0]`"),
    ('[routes]\n"gpt-*" = ["openai", "nowhere"]\n',
     "route 'gpt-*' needs configured providers, not ['openai', 'nowhere']"),
    ('[routes]\n"gpt-*" = []\n', "route 'gpt-*' needs configured providers"),
    # Each session would try the provider's deployments twice, each failure counted twice.
    ('[routes]\n"gpt-*" = ["openai", "azure", "openai"]\n[providers.azure]\nresource = "r"\n'
     'secret_env = "K"\n[providers.openai]\nsecret_env = "K"\n',
     "route 'gpt-*' lists 'openai' twice - at `$.routes.\"gpt-*\"`"),
    # Headers the sidecar writes itself, in any letter case: a second Host or
    # Sec-WebSocket-Key would make the upgrade request one the provider may misread.
    ('[providers.p]\nurl = "ws://h/"\nheaders = { Host = "elsewhere" }\n',
     "provider 'p': header 'Host' is set by the sidecar - at `$.providers.p.headers`"),
    ('[providers.p]\nurl = "ws://h/"\nheaders = { Sec-WebSocket-Protocol = "x" }\n',
     "provider 'p': header 'Sec-WebSocket-Protocol' is set by the sidecar - at `$.providers.p.headers`"),
    # The first rest would pass the cap that every later one keeps to.
    ('[circuit]\ncooldown_seconds = 90\nmax_cooldown_seconds = 60\n',
     "cooldown_seconds is over max_cooldown_seconds - at `$.circuit`"),
])
def test_config_errors_name_the_field(workdir, text, error):
    with pytest.raises(ConfigError) as exc:
        _load(workdir, text)
    assert error in str(exc.value)


def test_deployments_override_the_template_and_map_model_names(workdir):
    secret_file = os.path.join(workdir, "west")
    with open(secret_file, "w") as f:
        f.write("three\n")
    router = _load(workdir, """
        [providers.azure]
        secret_env = "K"
        selection = "least_sessions"
        [[providers.azure.deployments]]
        resource = "contoso-eastus2"
        weight = 3
        model_names = { "gpt-realtime" = "east-rt", "gpt-4o-*" = "east-4o" }
        [[providers.azure.deployments]]
        name = "sweden"
        resource = "contoso-swedencentral"
        secret_env = "K2"
        headers = { api-key = "{secret}", X-Region = "sweden" }
        [[providers.azure.deployments]]
        resource = "contoso-westus"
        secret_file = "%s"
        """.replace("\n        ", "\n") % secret_file)
    router.environ = {"K": "one", "K2": "two"}
    route = router.routes["azure"]
    assert route.selection == "least_sessions"
    assert [(t.label, t.weight) for t in route.targets] == [("0", 3), ("sweden", 1), ("2", 1)]
    east, sweden, west = route.targets
    assert router.upstream(west, "m").headers == [("api-key", "three")]   # not the provider's K
    up = router.upstream(east, "gpt-realtime")
    assert (up.uri.host, up.uri.resource_name) == (
        "contoso-eastus2.openai.azure.com", "/openai/v1/realtime?model=east-rt")
    assert up.headers == [("api-key", "one")]
    assert router.upstream(east, "gpt-4o-realtime").uri.resource_name.endswith("=east-4o")
    assert router.upstream(east, "other").uri.resource_name.endswith("=other")
    up = router.upstream(sweden, "gpt-realtime")
    assert up.uri.host == "contoso-swedencentral.openai.azure.com"
    assert up.uri.resource_name.endswith("=gpt-realtime")
    assert up.headers == [("api-key", "two"), ("X-Region", "sweden")]


def providers_admin(sidecar: SidecarProcess) -> subprocess.CompletedProcess:
    """`conduit-sidecar providers --admin` against this sidecar's admin listener."""
    return subprocess.run([sys.executable, "-m", "conduit_sidecar", "providers", "--config",
                           sidecar.config, "--admin", sidecar.admin("")],
                          capture_output=True, text=True, timeout=30)


def test_providers_command_shows_deployments_and_live_health(workdir):
    good, gone = Named("good"), held_port()
    sidecar = sidecar_with(workdir, deployments(
        f'name = "gone"\n{ws_url(gone)}', f'name = "good"\n{ws_url(good.port)}\nweight = 2'),
        extra="[circuit]\nfailures = 1\ncooldown_seconds = 60\n")

    async def body():
        async with good:
            ws, name = await open_session(sidecar)
            await ws.close()
            return name
    try:
        assert run(body()) == "good"
        r = providers_admin(sidecar)
    finally:
        sidecar.stop()
    assert r.returncode == 0, r.stderr
    assert "selection: least_sessions" in r.stdout
    assert f"deployment gone weight 1 ws://127.0.0.1:{gone}/ [resting]" in r.stdout
    assert f"deployment good weight 2 ws://127.0.0.1:{good.port}/ [healthy]" in r.stdout


def test_providers_command_shows_the_live_health_of_a_provider_without_deployments(workdir):
    # A provider with no `deployments` list runs as one deployment ("0"), whose circuit
    # rests as any other's: --admin must show it too.
    sidecar = sidecar_with(workdir, f"[providers.p]\n{ws_url(held_port())}\n",
                           extra="[circuit]\nfailures = 1\ncooldown_seconds = 60\n")
    try:
        assert run(close_of(sidecar))[0] == 1014
        r = providers_admin(sidecar)
    finally:
        sidecar.stop()
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("p "))
    assert line.endswith(" [resting]"), r.stdout
