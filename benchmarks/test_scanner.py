"""The relay's frame scanner in process, next to websockets' own sans-I/O parser
(`websockets.protocol.Protocol.receive_data`) on the same bytes: time per frame.

The relay scans the whole buffer per call (`scan_benchmark`); websockets is fed in
64 KiB pieces, as from socket reads, because its reader is meant to hold one read's
bytes, not megabytes. Both see each frame exactly once per call.
"""

import pytest
from websockets.protocol import Protocol, Side

from .wire import frames

relay = pytest.importorskip("conduit_sidecar._relay", reason="the relay is not built (pip install -e .)")
scan_benchmark = getattr(relay, "scan_benchmark", None)


def websockets_parse(chunks: list[bytes], masked: bool) -> int:
    """Frames parsed by a websockets server (masked input) or client protocol."""
    protocol = Protocol(Side.SERVER if masked else Side.CLIENT, max_size=None)
    seen = 0
    for chunk in chunks:
        protocol.receive_data(chunk)
        seen += len(protocol.events_received())
    return seen


@pytest.mark.parametrize("parser", ["sidecar", "websockets"])
@pytest.mark.parametrize("masked", [True, False], ids=["client-to-upstream", "upstream-to-client"])
@pytest.mark.parametrize("size", [160, 960, 4800, 65536])
def test_scan(benchmark, report_row, sizes, parser, masked, size):
    count = max(4, sizes.scanner_bytes // size)
    data = frames(size, count, masked)
    if parser == "sidecar":
        if scan_benchmark is None:
            pytest.skip("conduit_sidecar._relay has no scan_benchmark(data, masked, repeat) yet")
        run = lambda: scan_benchmark(data, masked, 1)
    else:
        chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
        run = lambda: websockets_parse(chunks, masked)
    benchmark.group = f"scanner: {size} B {'masked' if masked else 'unmasked'}"
    if sizes.quick:
        seen = benchmark.pedantic(run, rounds=3, iterations=1)
    else:
        seen = benchmark(run)
    assert seen == count
    ns = benchmark.stats.stats.median * 1e9 / count
    benchmark.extra_info["ns_per_frame"] = ns
    way = "client→upstream, masked" if masked else "upstream→client, unmasked"
    report_row("scanner", f"{size:,} B frames ({way})", parser, ns)
