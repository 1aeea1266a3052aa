"""atheris fuzz target for the relay's frame scanner (run: bash scripts/fuzz.sh).

The input is split into a header (direction, read cut points) and a byte stream; the
Cython scanner, fed the stream in those pieces, must agree with the pure-Python
reference scanner and keep its invariants."""

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

with atheris.instrument_imports():
    from reference_parser import scan

from conduit_sidecar._relay import Scanner

MARKER = b'"response.done"'


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    masked = fdp.ConsumeBool()
    limit = fdp.PickValueInList([1 << 62, 64, 1000])
    cuts = sorted(fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 6)))
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    s = Scanner(masked, max_message=limit, markers=() if masked else (MARKER,))
    last = 0
    for cut in [c for c in cuts if c <= len(stream)] + [len(stream)]:
        s.feed_bytes(stream[last:cut])
        last = cut
    ref = scan(stream, masked, limit, () if masked else (MARKER,))
    out = s.output
    assert stream.startswith(out), "the scanner forwarded bytes it was not given"
    assert all(0 < a < b for a, b in zip(s.frame_boundaries, s.frame_boundaries[1:]))
    assert (s.verdict_code, s.verdict_reason) == ref.verdict, (s.verdict_code, ref.verdict)
    assert s.frame_boundaries == ref.boundaries
    assert out == ref.output
    frames, payload, wire = s.counters()
    assert list(frames) == ref.frames and list(payload) == ref.payload and wire == ref.wire
    if not masked:
        assert s.metered == ref.metered


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
