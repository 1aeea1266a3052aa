"""What kernel TLS costs in memory per session, with a wss provider leg: fresh
sidecars with `kernel_tls` off and on, alternating, each with `n` sessions held
after one 960 B echo each (so every provider leg has sent through its send path).
Per session: the growth of the kernel's slab (`Slab`, `SUnreclaim` in /proc/meminfo,
machine-wide: the upstream's and this process's sockets too, alike in both modes)
and of the sidecar's RSS. In a kernel without the tls module both modes are OpenSSL's.

    bash scripts/ktls-vm.sh .venv/bin/python -m benchmarks.kernel_tls 300
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import uvloop

from conduit_sidecar import ktls

from . import harness
from .loadgen import Target, open_many, rss_bytes
from .memory import churn
from .wire import TEXT, frame


def _slab() -> tuple[int, int]:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["Slab"], info["SUnreclaim"]


async def measure(target: Target, n: int) -> dict:
    pids = target.pids()
    await churn(target, 200)
    await asyncio.sleep(1)
    slab, unreclaimable = _slab()
    rss = rss_bytes(pids)
    held = await open_many(target, n)
    for client in held:
        await client.send(frame(b"x" * 960, True, TEXT))
    for client in held:
        await client.text(2)  # the echo (the upstream's hello was the first)
    await asyncio.sleep(1)
    slab_n, unreclaimable_n = _slab()
    figures = {
        "slab_kib": (slab_n - slab) / n,
        "sunreclaim_kib": (unreclaimable_n - unreclaimable) / n,
        "sidecar_rss_kib": (rss_bytes(pids) - rss) / 1024 / n,
    }
    for client in held:
        client.transport.abort()
    return figures


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print(json.dumps({"kernel_tls_here": ktls.probe() or "yes"}), flush=True)  # as the sidecar probes
    for mode in ("0", "1", "0", "1"):
        os.environ["CONDUIT_KERNEL_TLS"] = mode  # inherited by the sidecar
        with harness.fresh_sidecar("conduit-ktls-", tls=True) as target:
            figures = uvloop.run(measure(target, n))
        print(json.dumps({"kernel_tls": mode, **{k: round(v, 2) for k, v in figures.items()}}), flush=True)


if __name__ == "__main__":
    main()
