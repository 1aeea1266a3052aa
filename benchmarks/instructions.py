"""User-space instructions per new session: a `conduit-sidecar serve` under valgrind's
callgrind, driven by `loadgen.handshakes` (connect, upgrade, the upstream's hello,
drop) against the benchmark upstream. Instruction counts do not swing with the
machine's load as times do: this is the handshake figure to compare two builds by.
They include what the sidecar does every second (its timers, the governor's tick),
so a run slowed by a loaded machine counts a little more: compare builds run side
by side, or on a quiet machine.
With `--frames`, instructions per relayed frame instead: one session's sequential
round trips through the echo (`loadgen.echoes`), each frame read and written alone,
as a voice session's are.

    python -m benchmarks.instructions              # 100 warm-up, 300 counted, 4 at a time
    python -m benchmarks.instructions --tls        # the provider leg over wss
    python -m benchmarks.instructions --upstream-host localhost   # a name, not an address
    python -m benchmarks.instructions --floor      # benchmarks.floor_relay instead of serve
    python -m benchmarks.instructions --frames audio    # per frame: 960-B binary frames
    python -m benchmarks.instructions --frames openai   # OpenAI events, metered (usage in 1 of 25)
    python -m benchmarks.instructions --frames audio --listener   # the client leg over wss
    python -m benchmarks.instructions --redis      # [state] in Redis: leases, rates, budgets
    python -m benchmarks.instructions --keep cg.out   # and keep callgrind's dump
    callgrind_annotate --inclusive=yes cg.out      # where the instructions went

Counting starts after the warm-up (`callgrind_control -z`) and ends with a dump
(`-d`) once the counted sessions have closed, so each session's close path is in.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import os
import shutil
import subprocess
import tempfile

import uvloop

from . import harness
from .loadgen import Target, connect, echoes, handshakes
from .wire import TEXT, frame

_DELTA = ('{"type":"response.output_audio.delta","event_id":"event_1","response_id":"resp_1",'
          '"item_id":"item_1","output_index":0,"content_index":0,"delta":"%s"}')
_DONE = ('{"type":"response.done","event_id":"event_2","response":{"id":"resp_1","status":"completed",'
         '"usage":{"total_tokens":160,"input_tokens":100,"output_tokens":60,'
         '"input_token_details":{"text_tokens":20,"audio_tokens":80,"cached_tokens":0},'
         '"output_token_details":{"text_tokens":10,"audio_tokens":50}}}}')


def messages(kind: str) -> list[bytes]:
    """The client frames `--frames kind` sends in turn, masked: `audio` one 960-byte
    binary frame (20 ms of 24 kHz PCM16); `openai` 24 audio deltas (960 bytes in
    base64) and a `response.done` with usage, which the echo returns for the relay
    to meter."""
    if kind == "audio":
        return [frame(os.urandom(960), True)]
    delta = _DELTA % base64.b64encode(os.urandom(960)).decode()
    return [frame(delta.encode(), True, TEXT)] * 24 + [frame(_DONE.encode(), True, TEXT)]


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
    return await _counted(target, out, handshakes(target, warm, parallel),
                          lambda: handshakes(target, sessions, parallel), 1, keep) / sessions


async def count_frames(target: Target, out: str, kind: str, warm: int, trips: int,
                       keep: str | None = None) -> float:
    """Instructions per relayed frame (two per round trip); as for `count`."""
    client = await connect(target, "echo")
    sent = messages(kind)
    total = await _counted(target, out, echoes(client, sent, warm),
                           lambda: echoes(client, sent, trips), 0.1, keep)
    client.transport.abort()
    return total / (2 * trips)


async def _counted(target: Target, out: str, warm_up, run, settle: float, keep: str | None) -> int:
    """The instructions the target ran for `run()`, counted after `warm_up` was
    awaited, until `settle` seconds after `run()` (the closes it caused handled, or
    the last frame's work after its write)."""
    pid = str(target.pids()[0])
    await warm_up
    subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
    await run()
    await asyncio.sleep(settle)
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    dumps = sorted(glob.glob(out.replace("%p", pid) + ".*"), key=os.path.getmtime)
    if keep:
        shutil.copy(dumps[-1], keep)
    return _total(dumps[-1])


def run(warm: int, sessions: int, parallel: int, tls: bool = False, keep: str | None = None,
        up_host: str = "127.0.0.1", floor: bool = False, frames: str | None = None,
        listener: bool = False, with_redis: bool = False) -> float:
    """Instructions per session, or with `frames` (`audio`, `openai`) per relayed
    frame over `sessions` round trips after `warm`."""
    if shutil.which("valgrind") is None:
        raise harness.Unavailable("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="conduit-callgrind-") as outdir:
        out = os.path.join(outdir, "callgrind.%p")
        under = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}")
        fresh = (harness.fresh_floor("conduit-instr-", under) if floor
                 else harness.fresh_sidecar("conduit-instr-", under, tls, up_host, listener,
                                            metered=frames == "openai", with_redis=with_redis))
        with fresh as target:
            if frames:
                return uvloop.run(count_frames(target, out, frames, warm, sessions, keep))
            return uvloop.run(count(target, out, warm, sessions, parallel, keep))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", choices=("audio", "openai"),
                   help="count per relayed frame of one session's round trips, not per new session")
    p.add_argument("--warm", type=int, help="sessions (round trips) before counting: 100 (500)")
    p.add_argument("--sessions", type=int, help="sessions (round trips) counted: 300 (2000)")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--tls", action="store_true", help="the provider leg over wss (a throwaway CA)")
    p.add_argument("--listener", action="store_true", help="the client leg over wss, to [tls] listen")
    p.add_argument("--redis", action="store_true",
                   help="[state] in a fresh redis-server, the key with leases, a session rate and a budget")
    p.add_argument("--floor", action="store_true",
                   help="count benchmarks.floor_relay (the stack alone, no features) instead of serve")
    p.add_argument("--keep", metavar="PATH", help="copy callgrind's dump of the counted sessions here")
    p.add_argument("--upstream-host", default="127.0.0.1",
                   help="how the provider URL names the upstream (e.g. localhost: a name to look up)")
    args = p.parse_args()
    if args.floor and (args.tls or args.listener or args.frames or args.redis
                       or args.upstream_host != "127.0.0.1"):
        p.error("--floor relays plain WebSocket to 127.0.0.1 only, per session")
    warm = args.warm if args.warm is not None else 500 if args.frames else 100
    n = args.sessions if args.sessions is not None else 2000 if args.frames else 300
    per = run(warm, n, args.parallel, args.tls, args.keep, args.upstream_host, args.floor,
              args.frames, args.listener, args.redis)
    what = "benchmarks.floor_relay" if args.floor else "serve"
    legs = ((", wss provider leg" if args.tls else "") + (", wss client leg" if args.listener else "")
            + (", Redis state" if args.redis else ""))
    if args.frames:
        print(f"{per:,.0f} user-space instructions per relayed {args.frames} frame of {what} "
              f"({n} round trips{legs}, upstream {args.upstream_host})")
        return
    print(f"{per / 1e6:.3f} M user-space instructions per new session of {what} "
          f"({n} sessions, {args.parallel} at a time{legs}, upstream {args.upstream_host})")


if __name__ == "__main__":
    main()
