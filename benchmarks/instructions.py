"""User-space instructions per new session: a `conduit-sidecar serve` under valgrind's
callgrind, driven by `loadgen.handshakes` (connect, upgrade, the upstream's hello,
drop) against the benchmark upstream. Instruction counts do not swing with the
machine's load as times do: this is the handshake figure to compare two builds by.

    python -m benchmarks.instructions              # 100 warm-up, 300 counted, 4 at a time
    python -m benchmarks.instructions --tls        # the provider leg over wss
    python -m benchmarks.instructions --upstream-host localhost   # a name, not an address
    python -m benchmarks.instructions --floor      # benchmarks.floor_relay instead of serve
    python -m benchmarks.instructions --keep cg.out   # and keep callgrind's dump
    callgrind_annotate --inclusive=yes cg.out      # where the instructions went

Counting starts after the warm-up (`callgrind_control -z`) and ends with a dump
(`-d`) once the counted sessions have closed, so each session's close path is in.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import tempfile

import uvloop

from . import harness
from .loadgen import Target, handshakes


def _total(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


async def count(target: Target, out: str, warm: int, sessions: int, parallel: int,
                keep: str | None = None) -> float:
    """Instructions per session; `out` is callgrind's output file pattern, `keep` a
    path to copy the counted dump to."""
    pid = str(target.pids()[0])
    await handshakes(target, warm, parallel)
    subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
    await handshakes(target, sessions, parallel)
    await asyncio.sleep(1)  # the closes are handled
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    dumps = sorted(glob.glob(out.replace("%p", pid) + ".*"), key=os.path.getmtime)
    if keep:
        shutil.copy(dumps[-1], keep)
    return _total(dumps[-1]) / sessions


def run(warm: int, sessions: int, parallel: int, tls: bool = False, keep: str | None = None,
        up_host: str = "127.0.0.1", floor: bool = False) -> float:
    if shutil.which("valgrind") is None:
        raise harness.Unavailable("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="conduit-callgrind-") as outdir:
        out = os.path.join(outdir, "callgrind.%p")
        under = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}")
        fresh = (harness.fresh_floor("conduit-instr-", under) if floor
                 else harness.fresh_sidecar("conduit-instr-", under, tls, up_host))
        with fresh as target:
            return uvloop.run(count(target, out, warm, sessions, parallel, keep))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm", type=int, default=100)
    p.add_argument("--sessions", type=int, default=300)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--tls", action="store_true", help="the provider leg over wss (a throwaway CA)")
    p.add_argument("--floor", action="store_true",
                   help="count benchmarks.floor_relay (the stack alone, no features) instead of serve")
    p.add_argument("--keep", metavar="PATH", help="copy callgrind's dump of the counted sessions here")
    p.add_argument("--upstream-host", default="127.0.0.1",
                   help="how the provider URL names the upstream (e.g. localhost: a name to look up)")
    args = p.parse_args()
    if args.floor and (args.tls or args.upstream_host != "127.0.0.1"):
        p.error("--floor relays plain WebSocket to 127.0.0.1 only")
    per = run(args.warm, args.sessions, args.parallel, args.tls, args.keep, args.upstream_host, args.floor)
    what = "benchmarks.floor_relay" if args.floor else "serve"
    print(f"{per / 1e6:.3f} M user-space instructions per new session of {what} "
          f"({args.sessions} sessions, {args.parallel} at a time{', wss provider leg' if args.tls else ''}"
          f", upstream {args.upstream_host})")


if __name__ == "__main__":
    main()
