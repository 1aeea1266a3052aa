"""The admin listener: /metrics, /healthz, /readyz, POST /drain (from 127.0.0.1 or ::1 only).

Every request must name an IP address or `localhost` as its Host (see _host_allowed).

Requests are parsed by websockets' HTTP/1.1 parser; one request per connection,
bounded in size and time, and in number: the port listens on the pod's address, so
any pod may connect, and what it can make the sidecar hold must have a fixed bound.
"""

from __future__ import annotations

import asyncio
import collections
import http
import ipaddress
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .config import split_hostport
from .httpread import BadRequest, RequestReader

__all__ = ["AdminServer"]

_MAX_REQUEST = 8192
_TIMEOUT = 5.0
# Prometheus and the kubelet's probes need a connection or two each. Past the limit
# per address a connection gets 503 at once, so that one pod cannot take them all;
# past the limit in all the oldest connection still sending its request is dropped,
# so that idle connections from many pods cannot starve the probes (whose requests
# arrive at once) and have the kubelet restart the sidecar.
_MAX_CONNECTIONS = 64
_MAX_PER_PEER = 8


def _response(
    status: int, reason: str, body: bytes, content_type="text/plain; charset=utf-8", extra=()
) -> bytes:
    headers = Headers(
        [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close"), *extra]
    )
    return Response(status, reason, headers, body).serialize()


# Exactly these, not all of 127.0.0.0/8: Istio's sidecar forwards some of other pods'
# connections to the app from 127.0.0.6, while a process of the pod itself that
# connects to 127.0.0.1 or ::1 comes from that same address (docs/kubernetes.md).
_POD_ITSELF = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def _host_allowed(headers: Headers) -> bool:
    """One Host that is an IP literal ("10.1.2.3", "[fd00::1]", with or without a port)
    or localhost. A web page that rebinds its own DNS name to 127.0.0.1 (a browser on the
    pod's host or in the app container) sends that name: refusing it keeps the page from
    reading the answers. Prometheus (pod IP), the kubelet's probes (pod IP) and
    `curl localhost` name an address."""
    hosts = headers.get_all("Host")
    if len(hosts) != 1:
        return False
    host = hosts[0]
    bracketed = host.startswith("[")
    if bracketed:
        name, bracket, rest = host[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":"):
            return False
        port = rest[1:]
    else:
        name, _, port = host.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        return False
    if not bracketed and name.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return bracketed == (address.version == 6)


def _from_pod_itself(transport) -> bool:
    peer = transport.get_extra_info("peername")
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, IndexError, ValueError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address in _POD_ITSELF


class _AdminProtocol(asyncio.Protocol):
    def __init__(self, admin: AdminServer):
        self.admin = admin
        self.reader: RequestReader | None = None
        self.peer: str | None = None  # the address it is counted under

    def connection_made(self, transport):
        self.transport = transport
        peer = str((transport.get_extra_info("peername") or ("",))[0])
        admin = self.admin
        counts = admin.connections
        full = counts.total() >= _MAX_CONNECTIONS
        # (none still reading at the limit in all: every one answered, its answer going out)
        if counts[peer] >= _MAX_PER_PEER or (full and not admin.reading):
            transport.write(_response(503, "Service Unavailable", b"too many admin connections\n"))
            transport.close()
            return
        if full:
            next(iter(admin.reading))._drop()
        counts[peer] += 1
        self.peer = peer
        admin.reading[self] = None
        self.reader = RequestReader(_MAX_REQUEST)
        self.timer = asyncio.get_running_loop().call_later(_TIMEOUT, self._drop)

    def data_received(self, data):
        if self.reader is None:
            return
        try:
            request = self.reader.feed(data)
        except BadRequest as exc:
            self._send(_response(exc.status, http.HTTPStatus(exc.status).phrase, (str(exc) + "\n").encode()))
            return
        if request is not None:
            self._answer(request)

    def _answer(self, request: Request):
        admin = self.admin
        path = request.path.split("?", 1)[0]
        routes = {"/metrics": "GET", "/healthz": "GET", "/readyz": "GET", "/drain": "POST"}
        if not _host_allowed(request.headers):
            why = b"admin requests must name an IP address or localhost as Host\n"
            return self._send(_response(421, "Misdirected Request", why))
        if path not in routes:
            return self._send(_response(404, "Not Found", b"not found\n"))
        if request.method != routes[path]:
            return self._send(
                _response(405, "Method Not Allowed", b"method not allowed\n", extra=[("Allow", routes[path])])
            )
        if path == "/metrics":
            body = generate_latest(admin.registry)
            return self._send(_response(200, "OK", body, CONTENT_TYPE_LATEST))
        if path == "/healthz":
            return self._send(_response(200, "OK", b"ok\n"))
        if path == "/readyz":
            if admin.ready():
                return self._send(_response(200, "OK", b"ready\n"))
            why = b"draining\n" if admin.draining() else b"not ready\n"
            return self._send(_response(503, "Service Unavailable", why))
        if not _from_pod_itself(self.transport):
            # Anyone who can reach the admin port (Prometheus, the kubelet, any pod)
            # may read it; only the pod itself may drain it. Kubernetes drains with
            # SIGTERM, which needs no request at all.
            return self._send(_response(403, "Forbidden", b"drain is only accepted from 127.0.0.1 or ::1\n"))
        if "Origin" in request.headers:
            # A web page in a browser on the pod's host or in its app container posts
            # from 127.0.0.1 too; browsers send Origin with every POST, curl sends none.
            return self._send(_response(403, "Forbidden", b"drain is not accepted from a web page\n"))
        admin.drain()
        return self._send(_response(202, "Accepted", b"draining\n"))

    def _send(self, data: bytes):
        # The timer stays: a peer that does not read the answer is dropped too.
        self.reader = None
        self.admin.reading.pop(self, None)
        self.transport.write(data)
        self.transport.close()

    def _drop(self):
        """Timed out, or the oldest still sending its request at the limit in all."""
        self._release()
        self.transport.abort()

    def _release(self):
        if self.peer is None:
            return
        self.reader = None
        self.timer.cancel()
        self.admin.reading.pop(self, None)
        counts = self.admin.connections
        counts[self.peer] -= 1
        if not counts[self.peer]:
            del counts[self.peer]
        self.peer = None

    def connection_lost(self, exc):
        self._release()


class AdminServer:
    """The admin listener; it sees the process only through the callables it is given."""

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        *,
        ready: Callable[[], bool],
        draining: Callable[[], bool],
        drain: Callable[[], None],
    ):
        self.listen = listen
        self.registry = registry
        self.ready = ready
        self.draining = draining
        self.drain = drain
        self.server: asyncio.AbstractServer | None = None
        self.connections: collections.Counter[str] = collections.Counter()  # open, per peer address
        self.reading: dict[_AdminProtocol, None] = {}  # still sending their request, oldest first

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound address."""
        host, port = split_hostport(self.listen)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _AdminProtocol(self), host, port, reuse_address=True)
        return self.server.sockets[0].getsockname()[:2]

    async def stop(self):
        if self.server is not None:
            self.server.close()
