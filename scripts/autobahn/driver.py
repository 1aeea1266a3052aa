"""The Autobahn `fuzzingserver` test client for run B, written with `websockets`.

Like Autobahn's own echo clients it asks the fuzzing server how many cases it has,
then for each case opens one connection and echoes every message it receives,
text as text and binary as binary, until the connection closes; at the end it asks
the server to write its reports for the agent.

Two ways to reach a case (the fuzzing server always sees a WebSocket client):

* direct: the driver connects to `ws://FUZZ/runCase?case=N&agent=AGENT` itself;
  this is the `websockets-direct` baseline.
* through the sidecar: the driver connects to the sidecar with `model=N` and a
  provider whose URL template is `ws://FUZZ/runCase?case={model}&agent=AGENT`, so
  the fuzzing server is testing the sidecar's upstream leg (and the driver behind it).

The websockets client reassembles fragmented messages and answers pings itself, so
some results belong to the driver: the gate is "through the sidecar no worse than
direct", never an absolute score.

    python scripts/autobahn/driver.py --fuzz ws://127.0.0.1:9001 --agent websockets-direct
    python scripts/autobahn/driver.py --fuzz ws://127.0.0.1:9001 --agent conduit-sidecar \
        --via 'ws://127.0.0.1:8080/v1/realtime/connect?provider=autobahn&model={case}' \
        --header 'Authorization: Bearer condt_...'
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.parse

# websockets fails a message of more than WEBSOCKETS_MAX_FRAGMENTS (default 4096)
# fragments with 1009; cases 9.3.* and 9.4.* send 4 MiB in fragments down to
# 64 bytes (65536 frames). Lift that guard (read at import) so that the baseline
# measures protocol handling only.
os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", str(1 << 20))

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidHandshake  # noqa: E402

_CLIENT_OPTIONS = dict(compression=None, max_size=None, max_queue=None, ping_interval=None,
                       open_timeout=30, close_timeout=10, user_agent_header=None)


async def case_count(fuzz: str) -> int:
    async with connect(f"{fuzz}/getCaseCount", **_CLIENT_OPTIONS) as ws:
        return int(await ws.recv())


async def echo_case(url: str, headers: list[tuple[str, str]], timeout: float) -> str:
    """Echo one case's messages until the connection closes; returns how it ended."""
    try:
        async with asyncio.timeout(timeout):
            async with connect(url, additional_headers=headers, **_CLIENT_OPTIONS) as ws:
                try:
                    async for message in ws:
                        await ws.send(message)
                except ConnectionClosed:
                    pass
                return f"closed {ws.close_code}"
    except TimeoutError:
        return f"timeout after {timeout:.0f}s"
    except (InvalidHandshake, ConnectionClosed, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


async def update_reports(fuzz: str, agent: str) -> None:
    query = urllib.parse.urlencode({"agent": agent})
    async with connect(f"{fuzz}/updateReports?{query}", **_CLIENT_OPTIONS) as ws:
        try:
            await ws.recv()
        except ConnectionClosed:
            pass


async def run(fuzz: str, agent: str, via: str | None = None, headers=(),
              case_timeout: float = 60.0, verbose: bool = False) -> dict[int, str]:
    """Run every case; `via` is a URL template with `{case}` (through the sidecar)."""
    count = await case_count(fuzz)
    outcomes: dict[int, str] = {}
    for n in range(1, count + 1):
        if via:
            url = via.format(case=n)
        else:
            url = f"{fuzz}/runCase?" + urllib.parse.urlencode({"case": n, "agent": agent})
        started = time.monotonic()
        outcomes[n] = await echo_case(url, list(headers), case_timeout)
        if verbose:
            print(f"{agent} case {n}/{count}: {outcomes[n]} "
                  f"({time.monotonic() - started:.2f}s)", flush=True)
    await update_reports(fuzz, agent)
    return outcomes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fuzz", required=True, help="the fuzzing server, e.g. ws://127.0.0.1:9001")
    p.add_argument("--agent", required=True, help="agent name in the reports")
    p.add_argument("--via", help="URL template with {case}: connect there instead (sidecar)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    p.add_argument("--case-timeout", type=float, default=60.0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    headers = [tuple(part.strip() for part in h.split(":", 1)) for h in args.header]
    outcomes = asyncio.run(run(args.fuzz, args.agent, args.via, headers,
                               args.case_timeout, args.verbose))
    stuck = {n: o for n, o in outcomes.items() if not o.startswith("closed")}
    print(f"{args.agent}: {len(outcomes)} cases, {len(stuck)} not closed cleanly", flush=True)
    for n, outcome in stuck.items():
        print(f"  case {n}: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
