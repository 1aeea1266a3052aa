"""Property tests: the Cython scanner agrees with tests/reference_parser.py on every
boundary, verdict and count, for generated frame streams split at random points."""

import os

from hypothesis import HealthCheck, given, settings, strategies as st

from conduit_sidecar._relay import Scanner
from reference_parser import scan

settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None)
settings.load_profile(os.environ.get("CONDUIT_HYPOTHESIS_PROFILE", "ci"))

MARKER = b'"response.done"'
USAGE = b'"usageMetadata"'       # Gemini Live's marker, often after other fields
# Metering set-ups: (markers, meter binary messages too, sniff window; 0: whole messages).
METERING = st.tuples(st.sampled_from([(MARKER,), (MARKER, USAGE), (USAGE,), (b"u",),
                                      (USAGE, b"x")]), st.booleans(),
                     st.sampled_from([0, 16, 64, 256, 1000]))


def encode(opcode, payload, masked, fin=True, rsv=0, key=b"\x01\x02\x03\x04", encoding="min"):
    n = len(payload)
    if encoding == "top":
        length = bytes([127, 0x80]) + bytes(7)
    elif n < 126 and encoding == "min":
        length = bytes([n])
    elif n < 65536 and encoding != "64":
        length = bytes([126]) + n.to_bytes(2, "big")
    else:
        length = bytes([127]) + n.to_bytes(8, "big")
    head = bytes([(0x80 if fin else 0) | rsv | opcode,
                  (0x80 if masked else 0) | length[0]]) + length[1:]
    if masked:
        return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return head + payload


close_payloads = st.one_of(
    st.just(b""),
    st.builds(lambda c, r: c.to_bytes(2, "big") + r,
              st.sampled_from([1000, 1001, 1002, 1011, 1012, 1013, 1014, 3000, 4000, 4999]),
              st.sampled_from([b"", b"bye", "\u00e9".encode(), b"x" * 123])))
text_payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda pad, marker, tail: b" " * pad + b'{"type":' + marker + tail,
              st.integers(0, 250), st.sampled_from([MARKER, USAGE]), st.binary(max_size=40)),
    # Markers split anywhere, repeated, after more than any window.
    st.builds(lambda pad, parts: b" " * pad + b"".join(parts), st.integers(0, 1100),
              st.lists(st.sampled_from([MARKER[:7], MARKER[7:], USAGE[:5], USAGE[5:], b"x"]),
                       max_size=8)))


# Control frames' lengths in the 16- and 64-bit forms too (not minimal; the endpoints
# accept them): a close frame is still judged whole.
CONTROL_ENCODINGS = st.sampled_from(["min"] * 4 + ["16", "64"])


@st.composite
def valid_frames(draw, masked):
    """A valid sequence: messages (whole or fragmented), control frames between
    fragments, maybe a close at the end."""
    frames = []
    for _ in range(draw(st.integers(0, 6))):
        opcode = draw(st.sampled_from([1, 2]))
        payload = draw(text_payloads)
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        parts = [payload[i:j] for i, j in zip([0] + cuts, cuts + [len(payload)])]
        for i, part in enumerate(parts):
            frames.append(dict(opcode=opcode if i == 0 else 0, payload=part,
                               fin=i == len(parts) - 1,
                               encoding=draw(st.sampled_from(["min"] * 6 + ["16", "64"]))))
            if draw(st.integers(0, 4)) == 0:
                frames.append(dict(opcode=draw(st.sampled_from([9, 10])),
                                   payload=draw(st.binary(max_size=125)),
                                   encoding=draw(CONTROL_ENCODINGS)))
    if draw(st.booleans()):
        frames.append(dict(opcode=8, payload=draw(close_payloads),
                           encoding=draw(CONTROL_ENCODINGS)))
        if draw(st.booleans()):
            frames.append(dict(opcode=2, payload=b"after the close"))
    return frames


MUTATIONS = ["rsv", "opcode", "mask", "top", "long_control", "fragmented_control",
             "orphan_continuation", "close_1_byte", "close_code", "close_utf8", "big"]


@st.composite
def stream(draw):
    masked = draw(st.booleans())
    frames = draw(valid_frames(masked))
    if frames and draw(st.booleans()):       # break one frame
        f = dict(frames[draw(st.integers(0, len(frames) - 1))])
        i = frames.index(next(x for x in frames if x == f)) if f in frames else 0
        m = draw(st.sampled_from(MUTATIONS))
        f.setdefault("fin", True)
        if m == "rsv":
            f["rsv"] = draw(st.sampled_from([0x10, 0x20, 0x40]))
        elif m == "opcode":
            f["opcode"] = draw(st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]))
        elif m == "mask":
            f["flip_mask"] = True
        elif m == "top":
            f["encoding"] = "top"
        elif m == "long_control":
            f.update(opcode=9, payload=b"p" * 126)
        elif m == "fragmented_control":
            f.update(opcode=10, fin=False)
        elif m == "orphan_continuation":
            f.update(opcode=0)
        elif m == "close_1_byte":
            f.update(opcode=8, payload=b"\x03")
        elif m == "close_code":
            f.update(opcode=8, payload=draw(st.sampled_from([0, 999, 1004, 1005, 1006, 1015,
                                                              2999, 5000])).to_bytes(2, "big"))
        elif m == "close_utf8":
            f.update(opcode=8, payload=b"\x03\xe8\xc3\x28")
        elif m == "big":
            f.update(payload=b"b" * 1100)
        frames[i] = f
    data = b"".join(
        encode(f["opcode"], f["payload"], masked != f.get("flip_mask", False), f.get("fin", True),
               f.get("rsv", 0), encoding=f.get("encoding", "min"))
        for f in frames)
    if draw(st.integers(0, 3)) == 0:          # the stream stops mid-frame
        data = data[:draw(st.integers(0, len(data)))]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    limit = draw(st.sampled_from([1 << 62, 1 << 62, 1000]))
    return masked, data, cuts, limit


@given(stream(), METERING)
def test_scanner_agrees_with_the_reference(case, metering):
    masked, data, cuts, limit = case
    markers, binary, window = metering
    if masked:
        markers = ()
    s = Scanner(masked, max_message=limit, markers=markers, meter_binary=binary,
                sniff_bytes=window)
    last = 0
    for cut in cuts + [len(data)]:
        s.feed_bytes(data[last:cut])
        last = cut
    ref = scan(data, masked, limit, markers, binary, window)
    assert (s.verdict_code, s.verdict_reason) == ref.verdict
    assert s.frame_boundaries == ref.boundaries
    frames, payload, wire = s.counters()
    assert list(frames) == ref.frames and list(payload) == ref.payload and wire == ref.wire
    assert s.output == ref.output
    if not masked:
        assert s.metered == ref.metered
