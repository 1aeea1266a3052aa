"""The load generator: raw WebSocket clients on asyncio BufferedProtocol.

Client frames are built and masked before a measurement starts and written in large
batches; round trips parse frame headers only, bulk downloads only count bytes. Every
measurement also reports the load generator's own CPU share (`loadgen_cpu`, CPU time
over wall time of this process) so a run whose client was the bottleneck shows it.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .wire import BINARY, TEXT, frame, frames, header, parse_header, request

_READ = memoryview(bytearray(256 * 1024))
_now = time.perf_counter_ns
GO = frame(b"go", True)


@dataclass
class Target:
    """Where the load goes: a proxy column, or the upstream itself (`direct`)."""
    name: str
    port: int
    path: Callable[[str], str]              # upstream path ("echo", ...) -> request target
    headers: dict = field(default_factory=dict)
    ssl: object = None                      # client-leg SSLContext
    process: object = None                  # the proxy's harness.Process; none for direct
    host: str = "127.0.0.1"

    def pids(self) -> list[int]:
        return self.process.pids() if self.process else []


class Client(asyncio.BufferedProtocol):
    """One session. After the 101, frames are parsed: text frames are timestamped
    into `texts`, binary frames go to `on_binary(time_ns, payload_length)`."""

    def __init__(self):
        loop = asyncio.get_running_loop()
        self.opened = loop.create_future()
        self.head = bytearray()
        self.pending = bytearray()
        self.on_data = self._handshake
        self.on_binary = None
        self.texts: list[int] = []
        self.waiter = None
        self.paused = None
        self.received = 0

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return _READ

    def buffer_updated(self, nbytes):
        self.on_data(nbytes)

    def pause_writing(self):
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self):
        self.paused.set_result(None)
        self.paused = None

    def connection_lost(self, exc):
        error = ConnectionError(f"connection lost: {exc}")
        for fut in (self.opened, self.waiter and self.waiter[1], self.paused):
            if fut is not None and not fut.done():
                fut.set_exception(error)

    def _handshake(self, n):
        self.head += _READ[:n]
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        if not self.head.startswith(b"HTTP/1.1 101"):
            self.opened.set_exception(ConnectionError(bytes(self.head[:end]).decode()))
            return
        self.on_data = self._frames
        rest = self.head[end + 4:]
        self.opened.set_result(None)
        if rest:
            _READ[:len(rest)] = rest
            self._frames(len(rest))

    def _frames(self, n):
        t = _now()
        buf = self.pending
        buf += _READ[:n]
        pos = 0
        while (h := parse_header(buf, pos, len(buf))) is not None:
            opcode, hlen, plen, _ = h
            if len(buf) - pos < hlen + plen:
                break
            pos += hlen + plen
            if opcode == TEXT:
                self.texts.append(t)
                if self.waiter and len(self.texts) >= self.waiter[0]:
                    self.waiter[1].set_result(None)
                    self.waiter = None
            elif opcode == BINARY and self.on_binary is not None:
                self.on_binary(t, plen)
        del buf[:pos]

    def _count(self, n):
        self.received += n
        if self.received >= self.expect and not self.counted.done():
            self.counted.set_result(_now())

    def count_bytes(self, expect: int) -> asyncio.Future:
        """From now on only count bytes; the future gets the time `expect` arrived."""
        self.expect = expect
        self.counted = asyncio.get_running_loop().create_future()
        self.on_data = self._count
        return self.counted

    async def text(self, k: int) -> int:
        """Arrival time of the k-th text frame."""
        if len(self.texts) < k:
            self.waiter = (k, asyncio.get_running_loop().create_future())
            await self.waiter[1]
        return self.texts[k - 1]

    async def send(self, data: bytes) -> None:
        self.transport.write(data)
        if self.paused is not None:
            await self.paused


async def connect(target: Target, model: str, hello: bool = True) -> Client:
    """Open a session to upstream path `/model`; with `hello`, also wait for the
    upstream's first text frame, so the whole chain is known to be connected."""
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        Client, target.host, target.port, ssl=target.ssl,
        server_hostname=target.host if target.ssl else None)
    client.transport.set_write_buffer_limits(high=4 << 20)
    client.transport.write(request(target.path(model), f"{target.host}:{target.port}",
                                   target.headers))
    await client.opened
    if hello:
        await client.text(1)
    return client


class Cpu:
    """CPU seconds of processes (from schedstat) and of this one, over a window."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.wall, self.own, self.their = time.monotonic(), time.process_time(), cpu_seconds(pids)

    def stop(self) -> dict:
        wall = time.monotonic() - self.wall
        return {"wall": wall, "proxy_cpu_s": cpu_seconds(self.pids) - self.their,
                "loadgen_cpu": (time.process_time() - self.own) / wall}


def cpu_seconds(pids: list[int]) -> float:
    """Run time of every thread, in exact nanoseconds (/proc/PID/stat's ticks round to
    0.25 µs per frame in the sessions case and swing ±15% between runs)."""
    ns = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    ns += int(f.read().split()[0])
            except OSError:
                pass        # a thread that just ended
    return ns / 1e9


def rss_bytes(pids: list[int], field: str = "VmRSS") -> int:
    """`field` of /proc/PID/status summed: VmRSS, or RssAnon (the pages private to the
    process; RssFile, the rest, are mapped files that processes of one image share)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return total * 1024


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


# -- measurements: each runs once and returns its figures ----------------------------

async def ping_pong(target: Target, count: int, size: int = 960) -> dict:
    """`count` sequential round trips of one masked binary frame through the echo."""
    client = await connect(target, "echo")
    message = frame(os.urandom(size), True)
    rtts, done = [], asyncio.get_running_loop().create_future()
    sent = 0

    def on_binary(t, length):
        nonlocal sent
        rtts.append(t - sent)
        if len(rtts) == count:
            done.set_result(None)
        else:
            sent = _now()
            client.transport.write(message)

    client.on_binary = on_binary
    cpu = Cpu(target.pids())
    sent = _now()
    client.transport.write(message)
    await done
    usage = cpu.stop()
    client.transport.abort()
    us = [r / 1000 for r in rtts]
    return {"p50_us": percentile(us, 50), "p99_us": percentile(us, 99), "frames": len(rtts),
            "loadgen_cpu": usage["loadgen_cpu"]}


async def echoes(client: Client, messages: list[bytes], count: int) -> None:
    """`count` sequential round trips through the echo, `messages` (whole masked
    frames, text or binary) sent in turn."""
    loop = asyncio.get_running_loop()
    for i in range(count):
        message = messages[i % len(messages)]
        if message[0] & 0x0F == TEXT:
            client.transport.write(message)
            await client.text(len(client.texts) + 1)
        else:
            echoed = loop.create_future()
            client.on_binary = lambda t, length, echoed=echoed: echoed.set_result(None)
            client.transport.write(message)
            await echoed


_batches: dict[tuple[int, bool], tuple[int, bytes]] = {}


def batch(size: int, masked: bool) -> tuple[int, bytes]:
    """(frame length, about 1 MiB of whole frames), built once per size."""
    if (size, masked) not in _batches:
        per = max(1, (1 << 20) // (size + 14))
        data = frames(size, per, masked)
        _batches[size, masked] = len(data) // per, data
    return _batches[size, masked]


async def bulk_up(target: Target, size: int, count: int) -> dict:
    """Client -> upstream: `count` frames written in ~1 MiB batches until the sink
    reports that every byte arrived."""
    flen, data = batch(size, True)
    per = len(data) // flen
    client = await connect(target, f"sink-{count * flen}", hello=False)
    cpu = Cpu(target.pids())
    t0, left = _now(), count
    while left:
        k = min(left, per)
        await client.send(data if k == per else data[:k * flen])
        left -= k
    t1 = await client.text(1)
    usage = cpu.stop()
    client.transport.abort()
    # The sink answers only once every byte arrived.
    return {**throughput(size, count, (t1 - t0) / 1e9, usage),
            "bytes": count * flen, "expected": count * flen}


async def bulk_down(target: Target, size: int, count: int) -> dict:
    """Upstream -> client: the source sends `count` frames; the client counts bytes."""
    client = await connect(target, f"source-{count}-{size}", hello=False)
    expected = count * (len(header(BINARY, size)) + size)
    counted = client.count_bytes(expected)
    cpu = Cpu(target.pids())
    t0 = _now()
    client.transport.write(GO)
    t1 = await counted
    usage = cpu.stop()
    await asyncio.sleep(0.05)       # anything beyond `expected` would be an error
    client.transport.abort()
    return {**throughput(size, count, (t1 - t0) / 1e9, usage),
            "bytes": client.received, "expected": expected}


def throughput(size: int, count: int, seconds: float, usage: dict) -> dict:
    return {"frames_per_s": count / seconds, "MB_per_s": count * size / seconds / 1e6,
            "frames": count, "loadgen_cpu": usage["loadgen_cpu"]}


async def open_many(target: Target, n: int, parallel: int = 50) -> list[Client]:
    gate = asyncio.Semaphore(parallel)

    async def one():
        async with gate:
            return await connect(target, "echo")

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def sessions(target: Target, n: int, rate: float, seconds: float,
                   warmup: float = 0.5, size: int = 960) -> dict:
    """`n` echo sessions each sending `rate` frames/s, spread evenly over time. Round
    trips and the proxy's CPU are taken over the window after `warmup`."""
    clients = await open_many(target, n)
    message = frame(os.urandom(size), True)
    rtts: list[int] = []
    counts = {"sent": 0, "received": 0}
    window = [False]

    for client in clients:
        client.sent_at = []
        client.next = 0

        def on_binary(t, length, client=client):
            if window[0]:
                rtts.append(t - client.sent_at[client.next])
            client.next += 1
            counts["received"] += 1

        client.on_binary = on_binary

    loop = asyncio.get_running_loop()
    # 1 ms ticks (the loop's timer resolution): a twentieth of the sessions each.
    groups = [clients[g::20] for g in range(20)]
    tick = 1 / rate / len(groups)
    start = loop.time()
    end = start + warmup + seconds
    i, due, cpu, at_start = 0, start, None, None
    while due < end:
        if cpu is None and due >= start + warmup:
            window[0], cpu, at_start = True, Cpu(target.pids()), dict(counts)
        for client in groups[i]:
            client.sent_at.append(_now())
            client.transport.write(message)
        counts["sent"] += len(groups[i])
        i = (i + 1) % len(groups)
        due += tick
        await asyncio.sleep(max(0.0, due - loop.time()))
    usage = cpu.stop()
    relayed = counts["sent"] + counts["received"] - at_start["sent"] - at_start["received"]
    window[0] = False
    deadline = loop.time() + 10
    while counts["received"] < counts["sent"] and loop.time() < deadline:
        await asyncio.sleep(0.01)
    for client in clients:
        client.transport.abort()
    us = [r / 1000 for r in rtts]
    return {"p50_us": percentile(us, 50), "p99_us": percentile(us, 99),
            "sent": counts["sent"], "received": counts["received"],
            "cpu_us_per_frame": usage["proxy_cpu_s"] * 1e6 / relayed if target.pids() else None,
            "achieved_rate": relayed / 2 / usage["wall"] / n,
            "loadgen_cpu": usage["loadgen_cpu"]}


async def handshakes(target: Target, total: int, parallel: int = 4) -> dict:
    """New sessions per second: connect, upgrade, and the upstream's hello (so the
    proxy's upstream connection is complete), then drop; `parallel` connectors."""
    left = total

    async def connector():
        nonlocal left
        while left > 0:
            left -= 1
            client = await connect(target, "echo")
            client.transport.abort()

    cpu = Cpu(target.pids())
    t0 = _now()
    await asyncio.gather(*(connector() for _ in range(parallel)))
    usage = cpu.stop()
    return {"sessions_per_s": total / ((_now() - t0) / 1e9), "sessions": total,
            "proxy_cpu_us_per_session":
                usage["proxy_cpu_s"] * 1e6 / total if target.pids() else None,
            "loadgen_cpu": usage["loadgen_cpu"]}


async def idle(target: Target, n: int, warm: int = 50) -> dict:
    """Proxy RSS per idle session: `warm` sessions first (one-off allocations), then
    the RSS growth from `n` more, all open at once."""
    pids = target.pids()
    held = await open_many(target, warm)
    await asyncio.sleep(0.5)
    before = rss_bytes(pids)
    held += await open_many(target, n)
    await asyncio.sleep(0.5)
    after = rss_bytes(pids)
    for client in held:
        client.transport.abort()
    return {"kib_per_session": (after - before) / 1024 / n, "sessions": n,
            "rss_mib": after / 2**20}
