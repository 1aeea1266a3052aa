"""The relay's frame scanner, fed streams split at every byte position."""

import os

import pytest
from websockets.frames import Close, Frame, Opcode

from conduit_sidecar._relay import Scanner, close_frame


def frame(opcode, payload, masked, fin=True):
    """Serialize with websockets' own frame writer (masks with a random key)."""
    return Frame(Opcode(opcode), payload, fin=fin).serialize(mask=masked)


def stream(masked):
    frames = [
        frame(1, b"", masked), frame(2, os.urandom(125), masked), frame(2, os.urandom(126), masked),
        frame(2, os.urandom(300), masked, fin=False), frame(9, b"ping", masked),
        frame(0, os.urandom(70000), masked, fin=False), frame(0, b"", masked),
        frame(10, b"", masked), frame(1, "é".encode() * 3, masked),
        frame(8, Close(1000, "bye").serialize(), masked),
    ]
    ends, total = [], 0
    for f in frames:
        total += len(f)
        ends.append(total)
    return b"".join(frames), ends


@pytest.mark.parametrize("masked", [True, False])
def test_every_split_point_forwards_verbatim(masked):
    data, ends = stream(masked)
    # Every split inside the headers and small frames; sampled inside the 70 KB payload.
    points = [i for i in range(len(data) + 1) if i < 1000 or i > len(data) - 200 or i % 997 == 0]
    for i in points:
        s = Scanner(masked)
        s.feed_bytes(data[:i])
        s.feed_bytes(data[i:])
        assert s.output == data, i
        assert s.frame_boundaries == ends, i
        assert s.verdict_code == 0
        frames, payload, wire = s.counters()
        assert frames == (2, 2, 3, 1, 1, 1) and wire == len(data)


def test_byte_by_byte():
    data, ends = stream(True)
    s = Scanner(True)
    for i in range(len(data)):
        s.feed_bytes(data[i:i + 1])
    assert s.output == data and s.frame_boundaries == ends


def test_read_whole_withholds_each_text_message_until_it_ends():
    """A session whose later messages are checked: each client text message is captured
    unmasked, and its bytes (with the control frames between its fragments) go out only
    once it has ended and been handed over, at every split point; a binary message
    passes as it comes."""
    text = "é model".encode() * 5000
    frames = [frame(2, b"audio", True), frame(1, text[:300], True, fin=False), frame(9, b"ping", True),
              frame(0, text[300:], True), frame(1, b"{}", True)]
    data = b"".join(frames)
    binary, end = len(frames[0]), len(data) - len(frames[-1])
    for i in [i for i in range(len(data) + 1) if i < 400 or i > end - 50 or i % 499 == 0]:
        s = Scanner(True, read_whole_up_to=1 << 20)
        s.feed_bytes(data[:i])
        if i >= binary:     # (a split frame header is held until it is whole)
            assert s.output == (data[:binary] if i < end else data[:end] if i < len(data) else data), i
        s.feed_bytes(data[i:])
        assert (s.output, s.metered, s.verdict_code) == (data, [text, b"{}"], 0), i


def test_read_whole_drops_an_unfinished_message_at_its_close():
    s = Scanner(True, read_whole_up_to=1 << 20)
    close = frame(8, Close(1000, "").serialize(), True)
    s.feed_bytes(frame(1, b"never ends", True, fin=False) + frame(9, b"", True) + close)
    assert (s.output, s.metered) == (close, [])


def test_read_whole_is_bounded():
    """Messages read whole are at most the limit given (first_message_bytes), and 4 MiB
    whatever it is: 1009 at the header, none of it sent. What is withheld besides a
    message's payload is at most 64 KiB."""
    for limit, bound in ((1 << 20, 1 << 20), (1 << 30, 4 << 20)):
        s = Scanner(True, read_whole_up_to=limit)
        s.feed_bytes(b"\x81\xff" + (bound + 1).to_bytes(8, "big") + b"mask")
        assert (s.verdict_code, s.verdict_reason, s.output) == (1009, f"message over {bound} bytes", b"")
    # Besides its payload, at most 64 KiB: control frames, and its fragments' headers
    # (empty continuation frames were withheld without bound).
    for between in (frame(9, bytes(125), True), frame(0, b"", True, fin=False)):
        s = Scanner(True, read_whole_up_to=1 << 20)
        s.feed_bytes(frame(1, b"x", True, fin=False) + between * (65536 // len(between)))
        assert s.verdict_code == 0
        s.feed_bytes(between * 2)
        assert (s.verdict_code, s.verdict_reason, s.output) == (
            1009, "control frames and fragment headers inside a message over 65536 bytes", b"")


def test_frames_after_a_close_are_dropped():
    data, _ = stream(False)
    s = Scanner(False)
    s.feed_bytes(data + frame(2, b"late", False))
    assert s.output == data


BAD = [
    (bytes([0xC2, 0]), 1002, "reserved bits set (no extension was negotiated)"),
    (bytes([0x83, 0]), 1002, "reserved opcode 3"),
    (bytes([0x8B, 0]), 1002, "reserved opcode 11"),
    (bytes([0x82, 0x80, 1, 2, 3, 4]), 1002, "masked frame from the upstream"),
    (bytes([0x09, 0]), 1002, "fragmented control frame"),
    (bytes([0x89, 126, 0, 126]) + b"x" * 126, 1002, "control frame payload over 125 bytes"),
    (bytes([0x80, 1]) + b"x", 1002, "continuation frame without a message to continue"),
    (bytes([0x02, 1]) + b"x" + bytes([0x81, 0]), 1002, "new data message inside a fragmented message"),
    (bytes([0x02, 1]) + b"x" + bytes([0x80, 0x7E, 0x01, 0x00]), 1009, "message over 256 bytes"),
    (bytes([0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 1]), 1002, "64-bit payload length with the top bit set"),
    (bytes([0x82, 127, 0, 0, 0, 0, 0, 0, 1, 1]), 1009, "message over 256 bytes"),
    (bytes([0x88, 1, 3]), 1002, "close frame with a 1-byte payload"),
    (bytes([0x88, 2, 0x03, 0xEC]), 1002, "invalid close code 1004"),
    (bytes([0x88, 2, 0x13, 0x88]), 1002, "invalid close code 5000"),
    (bytes([0x88, 4, 0x03, 0xE8, 0xC3, 0x28]), 1007, "invalid UTF-8 in close reason"),
]


@pytest.mark.parametrize("bad, code, reason", BAD)
def test_violations_are_caught_at_any_split(bad, code, reason):
    good = frame(2, b"ok", False)
    data = good + bad
    for i in range(len(data) + 1):
        s = Scanner(False, max_message=256)
        s.feed_bytes(data[:i])
        s.feed_bytes(data[i:])
        assert (s.verdict_code, s.verdict_reason) == (code, reason), i
        # Frames before the bad one went through; not one byte of the bad one did.
        valid = 3 if bad[0] == 0x02 else 0
        assert s.output == good + bad[:valid], i


def test_message_limit_counts_across_fragments():
    s = Scanner(False, max_message=100)
    s.feed_bytes(frame(2, b"x" * 60, False, fin=False) + frame(0, b"x" * 60, False))
    assert s.verdict_code == 1009


def test_client_side_requires_masks():
    s = Scanner(True)
    s.feed_bytes(bytes([0x82, 0]))
    assert (s.verdict_code, s.verdict_reason) == (1002, "unmasked frame from the client")


def test_own_close_frames_are_valid_and_bounded():
    f = close_frame(1001, "é" * 100, True)
    s = Scanner(True)
    s.feed_bytes(f)
    assert s.verdict_code == 0 and s.output == f and len(f) <= 2 + 4 + 125


@pytest.mark.parametrize("masked", [False, True])
def test_own_close_frames_carry_the_code_and_the_longest_whole_characters_of_the_reason(masked):
    keys = set()
    for reason in ["", "bye", "x" * 200, *("a" * k + "é€𝄞" * 60 for k in range(4))]:
        f = close_frame(4001, reason, masked)
        head = 6 if masked else 2
        assert f[0] == 0x88 and f[1] == (0x80 if masked else 0) | (len(f) - head)
        payload = bytes(b ^ f[2 + (i & 3)] for i, b in enumerate(f[head:])) if masked else f[head:]
        whole = b""
        for ch in reason:
            if len(whole) + len(ch.encode()) > 123:
                break
            whole += ch.encode()
        assert payload == (4001).to_bytes(2, "big") + whole, reason
        if masked:
            keys.add(f[2:6])
    assert len(keys) == (7 if masked else 0)  # a fresh mask per frame


def test_close_frame_in_a_long_length_form_is_judged_whole_across_reads():
    """`88 FE 00 05` (a 5-byte close payload in the 16-bit form) split before its
    payload: the scanner must wait for the payload, not read past what it was given."""
    key = b"\x01\x02\x03\x04"
    payload = b"\x03\xe8bye"
    data = bytes([0x88, 0xFE, 0, 5]) + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    for cut in range(len(data) + 1):
        s = Scanner(True)
        s.feed_bytes(data[:cut])
        s.feed_bytes(data[cut:])
        assert s.verdict_code == 0 and s.output == data, cut


def test_metering_markers_binary_and_window():
    """Any marker within the sniff window captures the whole message (even across
    fragments); binary messages only when asked; the window is configurable."""
    usage = b'{"serverContent":{},' + b" " * 400 + b'"usageMetadata":{"totalTokenCount":9}}'
    other = b'{"type":"response.done"}'
    data = (frame(2, usage, False) + frame(1, other, False)
            + frame(1, usage[:200], False, fin=False) + frame(9, b"p", False)
            + frame(0, usage[200:], False))
    markers = (b'"response.done"', b'"usageMetadata"')
    for binary, window, expect in [(False, 256, [other]), (False, 1024, [other, usage]),
                                   (True, 1024, [usage, other, usage])]:
        s = Scanner(False, markers=markers, meter_binary=binary, sniff_bytes=window)
        s.feed_bytes(data)
        assert s.metered == expect, (binary, window)
        assert s.output == data


def test_metering_whole_messages_finds_markers_past_any_window_and_split_reads():
    """Window 0 (Gemini Live's usage comes after kilobytes of audio): the whole message
    is searched as it passes, without a copy, and handed over from its first marker on,
    wherever reads and fragments split it."""
    usage = b'"usageMetadata":{"totalTokenCount":9}}'
    message = b'{"serverContent":{"modelTurn":"' + b"A" * 20000 + b'"},' + usage
    at = len(message) - len(usage)
    data = frame(2, message[:at - 5], False, fin=False) + frame(9, b"p", False) + frame(0, message[at - 5:], False)
    head = len(data) - len(usage) - 5
    for cut in range(head - 20, len(data), 3):
        s = Scanner(False, markers=(b'"usageMetadata"',), meter_binary=True, sniff_bytes=0)
        for piece in (data[:cut], data[cut:cut + 7], data[cut + 7:]):
            s.feed_bytes(piece)
        assert s.metered == [usage] and s.output == data, cut
    s = Scanner(False, markers=(b'"usageMetadata"',), sniff_bytes=0)
    s.feed_bytes(frame(2, message, False) + frame(1, b"usageMetadata", False))
    assert s.metered == []                      # binary unread; the text has no marker


@pytest.mark.parametrize("kw", [dict(markers=(b"",)), dict(markers=(b"x" * 300,)),
                                dict(markers=(b"x",), sniff_bytes=-1),
                                dict(markers=(b"x",), sniff_bytes=1 << 20),
                                dict(markers=(b"x" * 9000,), sniff_bytes=0),
                                dict(markers=(b"x",), sniff_bytes=0, masked=True),
                                # Whole messages: "cd" is found before the "abcdef" around it.
                                dict(markers=(b"abcdef", b"cd"), sniff_bytes=0)])
def test_metering_set_up_is_checked(kw):
    with pytest.raises(ValueError):
        Scanner(kw.pop("masked", False), **kw)


def test_a_scanner_is_counted_in_no_process_total():
    """The drain that reads a refused client's frames is a Scanner: its frames are
    discarded, not relayed, and conduit_frames_total counted them as relayed."""
    from conduit_sidecar import _relay
    before = _relay.totals()[:3]
    scanner = _relay.Scanner(True, record=False)
    scanner.feed_bytes(b"\x82\x83abcd" + b"xyz" + b"\x88\x80abcd")
    assert scanner.counters()[0][2] == 1                        # its own counts stay
    assert _relay.totals()[:3] == before
