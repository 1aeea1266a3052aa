"""The admin listener: /metrics, /healthz, /readyz, POST /drain (from loopback only).

Requests are parsed by websockets' HTTP/1.1 parser; one request per connection,
bounded in size and time.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.streams import StreamReader

from .config import split_hostport

if TYPE_CHECKING:
    from .server import Sidecar

__all__ = ["AdminServer"]

_MAX_REQUEST = 8192
_TIMEOUT = 5.0


def _response(status: int, reason: str, body: bytes, content_type="text/plain; charset=utf-8",
              extra=()) -> bytes:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Connection", "close"), *extra])
    return Response(status, reason, headers, body).serialize()


def _from_loopback(transport) -> bool:
    peer = transport.get_extra_info("peername")
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, IndexError, ValueError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class _AdminProtocol(asyncio.Protocol):
    def __init__(self, sidecar: Sidecar):
        self.sidecar = sidecar
        self.reader = StreamReader()
        self.parser = Request.parse(self.reader.read_line)
        next(self.parser)
        self.size = 0

    def connection_made(self, transport):
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(_TIMEOUT, transport.abort)

    def data_received(self, data):
        self.size += len(data)
        self.reader.feed_data(data)
        try:
            next(self.parser)
        except StopIteration as done:
            self._answer(done.value)
        except Exception:
            self._send(_response(400, "Bad Request", b"bad request\n"))
        else:
            if self.size > _MAX_REQUEST:
                self._send(_response(431, "Request Header Fields Too Large", b"too large\n"))

    def _answer(self, request: Request):
        sidecar = self.sidecar
        path = request.path.split("?", 1)[0]
        routes = {"/metrics": "GET", "/healthz": "GET", "/readyz": "GET", "/drain": "POST"}
        if path not in routes:
            return self._send(_response(404, "Not Found", b"not found\n"))
        if request.method != routes[path]:
            return self._send(_response(405, "Method Not Allowed", b"method not allowed\n",
                                        extra=[("Allow", routes[path])]))
        if path == "/metrics":
            body = generate_latest(sidecar.metrics.registry)
            return self._send(_response(200, "OK", body, CONTENT_TYPE_LATEST))
        if path == "/healthz":
            return self._send(_response(200, "OK", b"ok\n"))
        if path == "/readyz":
            if sidecar.ready:
                return self._send(_response(200, "OK", b"ready\n"))
            why = b"draining\n" if sidecar.draining else b"not ready\n"
            return self._send(_response(503, "Service Unavailable", why))
        if not _from_loopback(self.transport):
            # Anyone who can reach the admin port (Prometheus, the kubelet, any pod)
            # may read it; only the pod itself may drain it. Kubernetes drains with
            # SIGTERM, which needs no request at all.
            return self._send(_response(403, "Forbidden", b"drain is only accepted from loopback\n"))
        sidecar.drain()
        return self._send(_response(202, "Accepted", b"draining\n"))

    def _send(self, data: bytes):
        self.timer.cancel()
        self.transport.write(data)
        self.transport.close()

    def connection_lost(self, exc):
        self.timer.cancel()


class AdminServer:
    def __init__(self, sidecar: Sidecar):
        self.sidecar = sidecar
        self.server = None

    async def start(self):
        host, port = split_hostport(self.sidecar.config.admin_listen)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _AdminProtocol(self.sidecar), host, port,
                                               reuse_address=True)
        self.sidecar.listening["admin"] = self.server.sockets[0].getsockname()[:2]

    async def stop(self):
        if self.server is not None:
            self.server.close()
