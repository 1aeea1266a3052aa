"""The `floor` relay: the least a sidecar on this stack does per session, to measure
what a new session costs before any of the sidecar's own features.

websockets' sans-I/O layer reads the upgrade request and checks it (one shared
`ServerProtocol.accept`, as the sidecar's); the upstream's request is built once per
path by a `ClientProtocol` and each session only puts in a fresh key; websockets
reads the 101 and checks it; the client gets its 101; then both sockets are piped
as they are. No key check, route, limits, timeouts, relay, metrics or log lines:
what `serve` spends per session beyond this is its own.

    python -m benchmarks.floor_relay PORT UPSTREAM_PORT
    python -m benchmarks.instructions --floor        # its instructions per session
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from websockets.client import ClientProtocol
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.uri import parse_uri
from websockets.utils import generate_key

_checker = ServerProtocol(select_subprotocol=lambda _, __: None)


class _Upgrade:
    """An upstream path's upgrade request, split around its key."""

    def __init__(self, port: int, path: str):
        ws = self.ws = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{path}"))
        ws.parser.close()  # responses go to Response.parse: never fed
        data, key = ws.connect().serialize(), ws.key.encode()
        at = data.index(key)
        self.head, self.tail = data[:at], data[at + len(key):]


class _Pipe(asyncio.Protocol):
    """One direction after the 101: what is read is written to the other side."""

    def __init__(self, transport, other):
        self.transport, self.other = transport, other

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
    def __init__(self, port: int, upgrades: dict[str, _Upgrade]):
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

    def connection_lost(self, exc):
        pass

    async def open(self, request: Request, early: bytes):
        response = _checker.accept(request)
        if response.status_code != 101:
            self.transport.write(response.serialize())
            self.transport.close()
            return
        upgrade = self.upgrades.get(request.path) or self.upgrades.setdefault(
            request.path, _Upgrade(self.port, request.path))
        key = generate_key()
        upstream, up = await asyncio.get_running_loop().create_connection(
            lambda: _Upstream(upgrade.head + key.encode() + upgrade.tail), "127.0.0.1", self.port)
        reply, up_early = await up.result
        upgrade.ws.key = key
        upgrade.ws.process_response(reply)  # InvalidHandshake: the task fails, as a test would
        client = self.transport
        client.write(response.serialize())
        client.set_protocol(_Pipe(client, upstream))
        upstream.set_protocol(_Pipe(upstream, client))
        if up_early:
            client.write(up_early)
        if early:
            upstream.write(early)
        client.resume_reading()
        upstream.resume_reading()


async def main(port: int, up_port: int) -> None:
    upgrades: dict[str, _Upgrade] = {}
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
