"""What a connection costs a warmed sidecar before it is a session: RSS (`VmRSS`)
growth per connection, `n` of them held at once, each case on its own fresh sidecar
(one case's freed memory would hide the next one's cost), warmed by 2,000 sessions
opened and closed 50 at a time.

    python -m benchmarks.pending [N]                  # N = 300 connections a case
    PYTHONMALLOC=malloc python -m benchmarks.pending  # as the image runs the sidecar

Cases (docs/hardening.md, "Limits"; docs/benchmarks.md, "A burst at once"):
- a request head just under the 16 KiB `max_request_bytes`, 127 headers, never ended,
  no key shown: on the ws listener, and on the wss listener (after its TLS handshake);
- an upgrade with a valid key whose provider never answers: the session opening, with
  the provider leg over ws and over wss (its TLS handshake done, the 101 never sent).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

import uvloop

from . import harness
from .loadgen import Target, request
from .memory import churn, settle

_PAD = b"".join(b"X-Pad-%03d: %s\r\n" % (i, b"a" * 110) for i in range(127))
UNFINISHED = b"GET /v1/realtime/connect HTTP/1.1\r\n" + _PAD  # 15.9 KiB, no blank line
# (name, the wss listener, the provider leg over wss, an upgrade to a silent provider)
CASES = (
    ("ws listener, head unfinished, no key", False, False, False),
    ("wss listener, head unfinished, no key", True, False, False),
    ("session opening, provider silent", False, False, True),
    ("session opening, wss provider silent", False, True, True),
)


async def hold(target: Target, data: bytes, n: int) -> list[asyncio.Transport]:
    loop = asyncio.get_running_loop()

    async def one():
        transport, _ = await loop.create_connection(
            asyncio.Protocol, target.host, target.port, ssl=target.ssl,
            server_hostname=target.host if target.ssl else None)
        transport.write(data)
        return transport

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def measure(n: int) -> dict[str, float]:
    figures = {}
    for case, wss_listener, wss_provider, opening in CASES:
        with tempfile.TemporaryDirectory() as workdir:
            certs = harness.bench_certs(workdir) if wss_listener or wss_provider else None
            provider_certs = certs if wss_provider else None
            up, port = harness.upstream(workdir, provider_certs)
            s = harness.sidecar(workdir, port, provider_certs, certs if wss_listener else None)
            plain = harness.sidecar_target("ws", s)
            target = (harness.sidecar_target("wss", s, harness.client_context(certs))
                      if wss_listener else plain)
            pid = s.process.pids()[0]
            try:
                await churn(plain, 2000)
                data = (request(target.path("silent"), f"{target.host}:{target.port}", target.headers)
                        if opening else UNFINISHED)
                rest = await settle([pid], 3)
                held = await hold(target, data, n)
                during = await settle([pid], 2)
                for transport in held:
                    transport.abort()
            finally:
                s.process.stop()
                up.stop()
        figures[case] = (during - rest) * 1024 / n
        print(f"{case}: {figures[case]:.1f} KiB each ({rest:.1f} MiB at rest, {during:.1f} with {n})",
              flush=True)
    return figures


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print(f"PYTHONMALLOC={os.environ.get('PYTHONMALLOC', '(unset)')}", flush=True)
    uvloop.run(measure(n))


if __name__ == "__main__":
    main()
