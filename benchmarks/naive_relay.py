"""The `naive` column: a relay as one would first write it with websockets' asyncio
API, on uvloop, messages decoded and re-encoded both ways.

    python -m benchmarks.naive_relay PORT UPSTREAM_URL [--ca-file CA.pem]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

import uvloop
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def pump(source, sink) -> None:
    try:
        async for message in source:
            await sink.send(message)
    except ConnectionClosed:
        pass


async def main(port: int, upstream: str, context: ssl.SSLContext | None) -> None:
    async def relay(client):
        async with connect(upstream + client.request.path, ssl=context,
                           compression=None, max_size=None) as up:
            tasks = [asyncio.create_task(pump(client, up)), asyncio.create_task(pump(up, client))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()

    async with serve(relay, "127.0.0.1", port, compression=None, max_size=None, backlog=4096):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("upstream")
    p.add_argument("--ca-file")
    args = p.parse_args()
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    uvloop.run(main(args.port, args.upstream, context))
