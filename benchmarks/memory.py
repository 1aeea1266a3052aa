"""The sidecar's memory as an outside harness sees it: RSS (`VmRSS` in
/proc/PID/status) of a fresh `conduit-sidecar serve` process, driven over loopback by
this process (raw sockets, `loadgen.connect`) against the benchmark upstream.

    python -m benchmarks.memory                 # 2,000 warm-up, 1k/2k idle, 4k burst
    python -m benchmarks.memory --idle 500 --warm 500 --burst 1000   # smaller
    python -m benchmarks.memory --tls           # the provider leg over wss
    python -m benchmarks.memory --optimize      # the sidecar as the image runs it (-OO,
                                                # its modules' bytecode compiled beforehand,
                                                # PYTHONMALLOC=malloc unless set otherwise)

Method (docs/benchmarks.md, "Memory"):
- fresh and at rest, also the part private to the process (`RssAnon`; the rest is
  mapped library files, whose pages the sidecars of one image on a node share);
- at rest: six seconds after the warm-up, `warm` sessions opened and closed 50 at a
  time (every code path and cache touched once, but never more than 50 sessions
  held), as after the bursts below;
- per idle session: RSS growth from 1 held session to `idle`, then to 2 × `idle`,
  divided by the sessions added. The warm-up never held that many, so the growth is
  what each session costs, not freed memory reused;
- after the idle sessions close, after a burst of `burst` sessions opened at once
  and closed, and after `burst` more opened 50 at a time and closed: RSS six seconds
  later (the sidecar gives memory back from its poller,
  every `keys_poll_seconds`, 2 s here), next to the at-rest figure.

The sidecar must be fresh: a process that ran other cases (bulk transfers leave
megabytes of freed heap behind) hides the cost of new sessions in that free memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import sysconfig

import uvloop

import conduit_sidecar

from . import harness
from .loadgen import Target, connect, open_many, rss_bytes


async def churn(target: Target, total: int, parallel: int = 50) -> None:
    """Open and close `total` sessions, at most `parallel` at once."""
    left = total

    async def one():
        nonlocal left
        while left > 0:
            left -= 1
            (await connect(target, "echo")).transport.abort()

    await asyncio.gather(*(one() for _ in range(parallel)))


async def settle(pids: list[int], seconds: float = 1.0) -> float:
    """RSS in MiB once closed sessions are gone (the sidecar frees them on its loop)."""
    await asyncio.sleep(seconds)
    return rss_bytes(pids) / 2**20


async def measure(target: Target, warm: int, idle: int, burst: int, wait: float = 6) -> dict:
    """The figures above; `sessions` counts every session that opened."""
    pids = target.pids()
    fresh = await settle(pids, 0.5)
    fresh_anon = rss_bytes(pids, "RssAnon") / 2**20
    await churn(target, warm)
    rest = await settle(pids, wait)
    rest_anon = rss_bytes(pids, "RssAnon") / 2**20
    held = [await connect(target, "echo")]
    await asyncio.sleep(0.5)
    one = rss_bytes(pids)
    held += await open_many(target, idle - 1)
    at_1 = await settle(pids, 0.5)
    held += await open_many(target, idle)
    at_2 = await settle(pids, 0.5)
    opened = len(held)
    for client in held:
        client.transport.abort()
    after_idle = await settle(pids, wait)
    # A burst as clients make one (a reconnect storm): every connection at once. The
    # sidecar then has them all opening together, each holding its handshake's state
    # (12–14 KiB, benchmarks.pending); paced 50 at a time it holds a few dozen.
    bursting = await open_many(target, burst, burst)
    opened += len(bursting)
    peak = rss_bytes(pids) / 2**20
    for client in bursting:
        client.transport.abort()
    after_burst = await settle(pids, wait)
    paced = await open_many(target, burst)
    opened += len(paced)
    for client in paced:
        client.transport.abort()
    after_paced = await settle(pids, wait)
    return {
        "fresh_mib": fresh, "rest_mib": rest, "fresh_anon_mib": fresh_anon, "rest_anon_mib": rest_anon,
        "kib_per_session_1k": (at_1 * 2**20 - one) / 1024 / (idle - 1),
        "kib_per_session_2k": (at_2 - at_1) * 1024 / idle,
        "idle_1k_mib": at_1, "idle_2k_mib": at_2,
        "after_idle_mib": after_idle, "burst_peak_mib": peak, "after_burst_mib": after_burst,
        "after_burst_vs_rest": after_burst / rest,
        "after_paced_burst_mib": after_paced, "after_paced_burst_vs_rest": after_paced / rest,
        "warm": warm, "idle": idle, "burst": burst, "sessions": opened,
    }


def run(warm: int, idle: int, burst: int, wait: float = 6, tls: bool = False) -> dict:
    """A fresh upstream and sidecar in a temp dir, measured, then stopped. `wait`:
    seconds from the sessions' end to the RSS reading; `tls`: a wss provider leg."""
    with harness.fresh_sidecar("conduit-mem-", tls=tls) as target:
        return uvloop.run(measure(target, warm, idle, burst, wait))


def image_bytecode() -> str:
    """A PYTHONPYCACHEPREFIX holding -OO bytecode of the standard library, site-packages
    and the sidecar, as the image's `compileall -o 2` leaves them (build/pycache, made
    once and brought up to date). Without it, where PYTHONDONTWRITEBYTECODE is set or
    the caches are read-only, `serve` compiles every module that has no -OO bytecode
    from source at start, and is 0.6 MiB larger than in the image (docs/benchmarks.md)."""
    package = os.path.dirname(conduit_sidecar.__file__)
    prefix = os.path.join(os.path.dirname(package), "build", "pycache")
    env = {**os.environ, "PYTHONPYCACHEPREFIX": prefix}
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-o", "2",
                    "-x", "/(test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip)/",
                    sysconfig.get_path("stdlib"), sysconfig.get_path("purelib"), package],
                   env=env, stdout=subprocess.DEVNULL, check=True)
    return prefix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm", type=int, default=2000)
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--burst", type=int, default=4000)
    p.add_argument("--tls", action="store_true", help="the provider leg over wss, as in production")
    p.add_argument("--optimize", action="store_true",
                   help="the sidecar as the image runs it: PYTHONOPTIMIZE=2 (no docstrings) and "
                        "PYTHONMALLOC=malloc (unless PYTHONMALLOC is set)")
    args = p.parse_args()
    if args.optimize:  # read by the sidecar's interpreter, not this one
        os.environ["PYTHONOPTIMIZE"] = "2"
        os.environ.setdefault("PYTHONMALLOC", "malloc")
        os.environ["PYTHONPYCACHEPREFIX"] = image_bytecode()
    figures = run(args.warm, args.idle, args.burst, tls=args.tls)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                      for k, v in figures.items()}, indent=2))


if __name__ == "__main__":
    main()
