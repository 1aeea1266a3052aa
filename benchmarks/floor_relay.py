"""The `floor` relay: the least a sidecar on this stack does per session, to measure
what a new session costs before any of the sidecar's own features.

websockets' sans-I/O layer reads the upgrade request and the sidecar's shared
`ServerProtocol` checks it (`handshake._checker`, no Origin list); the upstream's request is the sidecar's
own `_Request` (built once per path by websockets' `ClientProtocol`, a fresh key per
session), which also checks the 101 websockets read; the client gets its 101; then
both sockets are piped as they are. No key check, route, limits, timeouts, relay,
metrics or log lines: what `serve` spends per session beyond this is its own.

    python -m benchmarks.floor_relay PORT UPSTREAM_PORT
    python -m benchmarks.instructions --floor        # its instructions per session
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from websockets.http11 import Request, Response
from websockets.streams import StreamReader
from websockets.uri import parse_uri

from conduit_sidecar.handshake import _checker
from conduit_sidecar.routing import Upstream
from conduit_sidecar.upstream import _Request


class _Pipe(asyncio.Protocol):
    """One direction after the 101: what is read is written to the other side."""

    def __init__(self, other):
        self.other = other

    def data_received(self, data):
        self.other.write(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.other.close()


class _Upstream(asyncio.Protocol):
    def __init__(self, request: bytes):
        self.request = request
        self.reader = StreamReader()
        self.parser = Response.parse(self.reader.read_line, self.reader.read_exact,
                                     self.reader.read_to_eof)
        next(self.parser)
        self.result = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        transport.write(self.request)

    def data_received(self, data):
        self.reader.feed_data(data)
        try:
            next(self.parser)
        except StopIteration as done:
            self.result.set_result((done.value, bytes(self.reader.buffer)))

    def connection_lost(self, exc):
        if not self.result.done():
            self.result.set_exception(ConnectionError("upstream closed during its handshake"))


class _Client(asyncio.Protocol):
    def __init__(self, port: int, upgrades: dict[str, _Request]):
        self.port, self.upgrades = port, upgrades
        self.reader = StreamReader()
        self.parser = Request.parse(self.reader.read_line)
        next(self.parser)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.parser is None:
            return
        self.reader.feed_data(data)
        try:
            next(self.parser)
        except StopIteration as done:
            self.parser = None
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self.open(done.value, bytes(self.reader.buffer)))

    async def open(self, request: Request, early: bytes):
        response = _checker(None).accept(request)
        if response.status_code != 101:
            self.transport.write(response.serialize())
            self.transport.close()
            return
        upgrade = self.upgrades.get(request.path)
        if upgrade is None:
            uri = parse_uri(f"ws://127.0.0.1:{self.port}{request.path}")
            upgrade = self.upgrades[request.path] = _Request(Upstream(uri, [], None), None)
        key, data = upgrade.new()
        upstream, up = await asyncio.get_running_loop().create_connection(
            lambda: _Upstream(data), "127.0.0.1", self.port)
        reply, up_early = await up.result
        upgrade.check(key, reply)  # InvalidHandshake: the task fails, as a test would
        client = self.transport
        client.write(response.serialize())
        client.set_protocol(_Pipe(upstream))
        upstream.set_protocol(_Pipe(client))
        if up_early:
            client.write(up_early)
        if early:
            upstream.write(early)
        client.resume_reading()
        upstream.resume_reading()


async def main(port: int, up_port: int) -> None:
    upgrades: dict[str, _Request] = {}
    await asyncio.get_running_loop().create_server(
        lambda: _Client(up_port, upgrades), "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("upstream_port", type=int)
    args = p.parse_args()
    uvloop.run(main(args.port, args.upstream_port))
