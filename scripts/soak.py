"""Soak: N concurrent sessions at 50 frames/s each (960-B binary frames carrying
sequence numbers) through the sidecar to an echo upstream, for T seconds. Every echo
is checked (no loss, duplication or reordering); afterwards the sidecar's open file
descriptors and RSS are compared with the baseline.

    python scripts/soak.py                       # 1,000 sessions x 60 s
    python scripts/soak.py --sessions 200 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import uvloop

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from conftest import Keys, SidecarProcess, held_port  # noqa: E402

PAYLOAD = 960
MASK = b"\x37\xfa\x21\x3d"
MASK_INT = int.from_bytes(MASK * (PAYLOAD // 4), "little")
CLIENT_FRAME = 8 + PAYLOAD          # 0x82, 0xFE, length 16 bits, mask key, payload
SERVER_FRAME = 4 + PAYLOAD

ECHO = r'''
import asyncio, sys, uvloop
from websockets.utils import accept_key
P = 960; MASK_LEN = 8 + P
class Echo(asyncio.Protocol):
    def connection_made(self, t): self.t, self.head, self.buf = t, b"", bytearray()
    def data_received(self, d):
        if self.head is not None:
            self.head += d
            if b"\r\n\r\n" not in self.head: return
            h, rest = self.head.split(b"\r\n\r\n", 1)
            key = next(l.split(b": ", 1)[1] for l in h.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")).decode()
            self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n")
            self.head, d = None, rest
        self.buf += d
        out = []
        while len(self.buf) >= 2:
            op = self.buf[0] & 0x0F
            if op == 8:                                   # close: answer and end
                n = self.buf[1] & 0x7F
                if len(self.buf) < 6 + n: break
                key = self.buf[2:6]
                body = bytes(b ^ key[i & 3] for i, b in enumerate(self.buf[6:6 + n]))
                out.append(bytes([0x88, n]) + body)
                self.t.write(b"".join(out)); self.t.close(); return
            if len(self.buf) < MASK_LEN: break
            key = int.from_bytes(bytes(self.buf[4:8]) * (P // 4), "little")
            payload = (int.from_bytes(self.buf[8:MASK_LEN], "little") ^ key).to_bytes(P, "little")
            out.append(b"\x82\x7e\x03\xc0" + payload)
            del self.buf[:MASK_LEN]
        if out: self.t.write(b"".join(out))
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_server(Echo, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
'''


def client_frame(seq: int) -> bytes:
    payload = seq.to_bytes(8, "big") + bytes(PAYLOAD - 8)
    body = (int.from_bytes(payload, "little") ^ MASK_INT).to_bytes(PAYLOAD, "little")
    return b"\x82\xfe\x03\xc0" + MASK + body


class Session(asyncio.Protocol):
    def __init__(self, stats, key):
        self.stats, self.key = stats, key
        self.head, self.buf, self.sent, self.seq = b"", bytearray(), 0, 0
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        transport.write(b"GET /v1/realtime/connect?provider=echo HTTP/1.1\r\nHost: x\r\n"
                        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                        b"Authorization: Bearer " + self.key + b"\r\n\r\n")

    def data_received(self, data):
        if self.head is not None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, data = self.head.split(b"\r\n\r\n", 1)
            self.head = None
            if not head.startswith(b"HTTP/1.1 101"):
                self.stats["errors"] += 1
                self.transport.close()
                return
            self.ready.set_result(None)
        self.buf += data
        while len(self.buf) >= 2:
            if self.buf[0] == 0x88:
                if self.buf[2:4] != b"\x03\xe8":
                    self.stats["errors"] += 1
                self.buf.clear()
                return
            if len(self.buf) < SERVER_FRAME:
                return
            seq = int.from_bytes(self.buf[4:12], "big")
            if self.buf[:4] != b"\x82\x7e\x03\xc0" or seq != self.seq:
                self.stats["errors"] += 1       # lost, duplicated, reordered or corrupted
            self.seq = seq + 1
            self.stats["received"] += 1
            del self.buf[:SERVER_FRAME]

    def send(self):
        self.transport.write(client_frame(self.sent))
        self.sent += 1
        self.stats["sent"] += 1

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(None)


def proc_stats(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def drive(sidecar_port: int, key: bytes, sessions: int, seconds: float, pid: int) -> dict:
    loop = asyncio.get_running_loop()
    stats = {"sent": 0, "received": 0, "errors": 0}
    conns = []
    for i in range(0, sessions, 100):
        batch = [Session(stats, key) for _ in range(min(100, sessions - i))]
        await asyncio.gather(*(loop.create_connection(lambda s=s: s, "127.0.0.1", sidecar_port)
                               for s in batch))
        await asyncio.wait_for(asyncio.gather(*(s.ready for s in batch)), 30)
        conns += batch
    peak = proc_stats(pid)
    start = loop.time()
    tick = 0
    while loop.time() < start + seconds:
        for i, s in enumerate(conns):               # spread each tick's sends over 20 ms
            loop.call_at(start + tick * 0.02 + i * 0.02 / sessions, s.send)
        tick += 1
        await asyncio.sleep(max(0.0, start + tick * 0.02 - loop.time()))
        if tick % 50 == 0:
            peak = max(peak, proc_stats(pid))
    deadline = loop.time() + 10
    while stats["received"] < stats["sent"] and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for s in conns:
        s.transport.write(b"\x88\x82" + MASK + bytes(b ^ MASK[i] for i, b in enumerate(b"\x03\xe8")))
    await asyncio.wait_for(asyncio.gather(*(s.closed for s in conns)), 30)
    stats["peak_rss_kib"], stats["peak_fds"] = peak
    return stats


def soak(sessions: int = 1000, seconds: float = 60.0, rounds: int = 1) -> dict:
    """Counts are those of the last round; RSS is sampled after every round (a second
    round that does not grow it shows the memory kept after the first is reused)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * sessions + 1024)), hard))
    echo_port = held_port()
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(echo_port)], stdout=subprocess.PIPE)
    assert echo.stdout.readline().strip() == b"ready"
    keys = Keys()
    keys.add("soak")
    sidecar = SidecarProcess(tempfile.mkdtemp(prefix="conduit-soak-"),
                             f'[providers.echo]\nurl = "ws://127.0.0.1:{echo_port}/"\n', keys,
                             limits=f"max_connections = {sessions + 100}")
    sidecar.start()
    try:
        time.sleep(0.3)
        before = proc_stats(sidecar.proc.pid)
        t0 = time.monotonic()
        after_rounds = []
        for _ in range(rounds):
            stats = uvloop.run(drive(sidecar.port, keys.plain["soak"].encode(), sessions,
                                     seconds, sidecar.proc.pid))
            time.sleep(1.0)
            after_rounds.append(proc_stats(sidecar.proc.pid)[0])
        stats["wall_seconds"] = round(time.monotonic() - t0, 1)
        after = proc_stats(sidecar.proc.pid)
        stats.update(sessions=sessions, seconds=seconds, rss_kib_before=before[0],
                     rss_kib_after=after[0], rss_kib_after_each_round=after_rounds,
                     fds_before=before[1], fds_after=after[1],
                     sidecar_alive=sidecar.proc.poll() is None,
                     session_ends_logged=sum(1 for l in sidecar.log_lines()
                                             if l.get("event") == "session_end") // rounds)
        return stats
    finally:
        sidecar.stop()
        echo.kill()
        echo.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    stats = soak(args.sessions, args.seconds, args.rounds)
    print(json.dumps(stats, indent=2))
    ok = stats["errors"] == 0 and stats["received"] == stats["sent"] and stats["sidecar_alive"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
