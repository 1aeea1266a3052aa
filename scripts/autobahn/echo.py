"""The reference echo provider for the Autobahn runs: a plain `websockets` server.

It echoes every text and binary message back as it came, on any path and query
(the sidecar's provider URL carries `?model=...`). No compression is negotiated,
no message size limit applies and no keepalive pings are sent, so that the only
WebSocket behaviour under test is that of `websockets` itself (run A, "echo
alone") or of the sidecar in front of it (run A, "through the sidecar").

    python scripts/autobahn/echo.py --port 9002     # prints "echo listening on PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import os

# websockets fails a message of more than WEBSOCKETS_MAX_FRAGMENTS (default 4096)
# fragments with 1009; cases 9.3.* and 9.4.* send 4 MiB in fragments down to
# 64 bytes (65536 frames). Lift that guard (read at import) so that the baseline
# measures protocol handling only.
os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", str(1 << 20))

from websockets.asyncio.server import ServerConnection, serve  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402


async def echo(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


async def main(host: str, port: int) -> None:
    async with serve(echo, host, port, compression=None, max_size=None, max_queue=None,
                     ping_interval=None, close_timeout=5) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"echo listening on {bound}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = p.parse_args()
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass
