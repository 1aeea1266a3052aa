"""The relay's frame scanner in process, next to websockets' own sans-I/O parser
(`websockets.protocol.Protocol.receive_data`) on the same bytes: time per frame.

The relay scans the whole buffer per call (`scan_benchmark`); websockets is fed in
64 KiB pieces, as from socket reads, because its reader is meant to hold one read's
bytes, not megabytes. Both see each frame exactly once per call.
"""

import pytest
from websockets.protocol import Protocol, Side

from .wire import TEXT, frame, frames

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
def test_scan(benchmark, timed, report_row, sizes, parser, masked, size):
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
    seen = timed(run)
    assert seen == count
    ns = benchmark.stats.stats.median * 1e9 / count
    benchmark.extra_info["ns_per_frame"] = ns
    way = "client→upstream, masked" if masked else "upstream→client, unmasked"
    report_row("scanner", f"{size:,} B frames ({way})", parser, ns)


@pytest.mark.parametrize("mode", ["cut-through", "read whole", "may_name"])
def test_read_whole(benchmark, timed, report_row, sizes, mode):
    """What a session whose later messages are checked pays per client text message,
    a 6.4 KB audio append: the relay reading it whole (captured, unmasked, withheld,
    released) against scanning it cut-through, and the Python test that then passes it
    unparsed (held.may_name)."""
    import base64
    import json
    import os

    from conduit_sidecar import held

    message = json.dumps({"type": "input_audio_buffer.append",
                          "audio": base64.b64encode(os.urandom(4800)).decode()}).encode()
    data = frame(message, True, TEXT)
    count = max(4, sizes.scanner_bytes // len(data))
    data *= count
    if mode == "may_name":
        run = lambda: sum(not held.may_name(message) for _ in range(count))  # noqa: E731
    else:
        limit = 1 << 20 if mode == "read whole" else 0

        def run():
            s = relay.Scanner(True, record=False, read_whole_up_to=limit)
            s.feed_bytes(data)
            return s.counters()[0][1]
    benchmark.group = "scanner: a 6.4 KB client text message read whole"
    seen = timed(run)
    assert seen == count
    ns = benchmark.stats.stats.median * 1e9 / count
    benchmark.extra_info["ns_per_message"] = ns
    report_row("scanner", "6.4 KB client text message (audio append), read whole", mode, ns)


@pytest.mark.parametrize("mode", ["unmetered", "metered"])
@pytest.mark.parametrize("ms", [100, 1000])
def test_metered_gemini_audio(benchmark, timed, report_row, sizes, mode, ms):
    """What Gemini Live metering costs per provider message, a binary JSON message with
    `ms` of 24 kHz audio (6.4 KB of base64 per 100 ms) and no usage: scanned cut-through
    unmetered, against searched for `usageMetadata` as the session meters it."""
    import base64
    import json
    import random

    from conduit_sidecar.metering import METERS

    gemini = METERS["gemini"]
    audio = random.Random(1).randbytes(48 * ms)
    part = {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": base64.b64encode(audio).decode()}}
    message = json.dumps({"serverContent": {"modelTurn": {"parts": [part]}}}).encode()
    data = frame(message, False)
    count = max(4, sizes.scanner_bytes // len(data))
    data *= count
    meter = dict(markers=gemini.markers, meter_binary=True, sniff_bytes=gemini.sniff_bytes) if mode == "metered" else {}

    def run():
        s = relay.Scanner(False, record=False, **meter)
        s.feed_bytes(data)
        return s.counters()[0][2]
    benchmark.group = f"scanner: a Gemini message with {ms} ms of audio, metered"
    seen = timed(run)
    assert seen == count
    ns = benchmark.stats.stats.median * 1e9 / count
    benchmark.extra_info["ns_per_message"] = ns
    report_row("scanner", f"Gemini message with {ms} ms of audio (provider to client)", mode, ns)
