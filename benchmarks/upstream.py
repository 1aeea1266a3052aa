"""The benchmarks' upstream provider: a minimal, fast WebSocket server in its own
process, so that it outruns whatever it is measured through.

    python -m benchmarks.upstream PORT [--cert FILE --key FILE]

Paths (the sidecar's `{model}`):
  /echo          a text hello first (like a provider's `session.created`), then every
                 data frame echoed unmasked; ping answered, close answered and closed
  /sink-N        counts bytes, does not parse them; after N bytes sends one text frame
  /source-N-S    on the client's first bytes, sends N binary frames of S bytes
  /silent        never answers the upgrade (a session held opening)

asyncio on uvloop with BufferedProtocol: one read buffer serves every connection,
frames are built in advance and written in chunks of about 1 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl

import uvloop

from .wire import CLOSE, PING, PONG, TEXT, apply_mask, frame, parse_header, response

HELLO = frame(b'{"type":"session.created"}', False, TEXT)
DONE = frame(b'{"type":"done"}', False, TEXT)
_READ = memoryview(bytearray(256 * 1024))
_chunks: dict[int, tuple[int, bytes]] = {}


def chunk(size: int) -> tuple[int, bytes]:
    """(frame length, about 1 MiB of whole frames of `size` payload bytes)."""
    if size not in _chunks:
        one = frame(os.urandom(size), False)
        _chunks[size] = len(one), one * max(1, (1 << 20) // len(one))
    return _chunks[size]


class Upstream(asyncio.BufferedProtocol):
    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=4 << 20)
        self.head = bytearray()
        self.pending = bytearray()
        self.on_data = self.handshake
        self.paused = self.streaming = False

    def get_buffer(self, sizehint):
        return _READ

    def buffer_updated(self, nbytes):
        self.on_data(nbytes)

    def eof_received(self):
        return None

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.streaming:
            self.pump()

    def handshake(self, n):
        self.head += _READ[:n]
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        mode, *args = self.head.split(b" ", 2)[1].decode().lstrip("/").split("-")
        if mode == "silent":
            self.on_data = self.ignore
            return
        self.transport.write(response(bytes(self.head[:end])))
        rest = self.head[end + 4:]
        if mode == "echo":
            self.transport.write(HELLO)
            self.on_data = self.echo
        elif mode == "sink":
            self.left = int(args[0])
            self.on_data = self.sink
        elif mode == "source":
            self.left, self.size = int(args[0]), int(args[1])
            self.on_data = self.source
        else:
            self.transport.abort()
            return
        if rest:
            _READ[:len(rest)] = rest
            self.on_data(len(rest))

    def echo(self, n):
        buf = self.pending
        buf += _READ[:n]
        pos, out = 0, []
        while (h := parse_header(buf, pos, len(buf))) is not None:
            opcode, hlen, plen, key = h
            if len(buf) - pos < hlen + plen:
                break
            payload = bytes(buf[pos + hlen:pos + hlen + plen])
            if key:
                payload = apply_mask(payload, key)
            pos += hlen + plen
            if opcode == CLOSE:
                self.transport.write(b"".join(out) + frame(payload, False, CLOSE))
                self.transport.close()
                return
            if opcode != PONG:
                out.append(frame(payload, False, PONG if opcode == PING else opcode))
        del buf[:pos]
        if out:
            self.transport.write(b"".join(out))

    def sink(self, n):
        self.left -= n
        if self.left <= 0:
            self.transport.write(DONE)
            self.on_data = self.ignore

    def source(self, n):
        self.on_data = self.ignore
        self.streaming = True
        self.pump()

    def pump(self):
        flen, data = chunk(self.size)
        while self.left and not self.paused:
            k = min(self.left, len(data) // flen)
            self.transport.write(data if k * flen == len(data) else data[:k * flen])
            self.left -= k

    def ignore(self, n):
        pass


async def serve(port: int, context: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Upstream, "127.0.0.1", port, ssl=context, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--cert")
    p.add_argument("--key")
    args = p.parse_args()
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    uvloop.run(serve(args.port, context))


if __name__ == "__main__":
    main()
