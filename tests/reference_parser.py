"""A small pure-Python WebSocket frame scanner with the relay's rules, written for
clarity, to check the Cython scanner against (tests and the fuzz target)."""

VALID_CLOSE = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))
KIND = {0: 0, 1: 1, 2: 2, 8: 3, 9: 4, 10: 5}


class Result:
    def __init__(self):
        self.output = b""
        self.boundaries = []
        self.frames = [0] * 6
        self.payload = [0] * 6
        self.wire = 0
        self.verdict = (0, None)
        self.metered = []


def scan(data: bytes, masked: bool, max_message: int = 1 << 62, markers: tuple = (),
         binary: bool = False, window: int = 256):
    """Metering: text messages (and binary ones if `binary`) with any of `markers` in
    their first `window` bytes are kept in `metered`; window 0: with a marker anywhere,
    from their first marker on."""
    r = Result()
    pos = 0
    fragmented = False
    message = 0
    text = None           # payload of the text message being metered

    def fail(code, reason):
        r.verdict = (code, reason)
        return r

    while True:
        if len(data) - pos < 2:
            return r
        b0, b1 = data[pos], data[pos + 1]
        fin, rsv, opcode, has_mask, n = b0 & 0x80, b0 & 0x70, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
        hlen = 2 + (4 if has_mask else 0) + (2 if n == 126 else 8 if n == 127 else 0)
        if len(data) - pos < hlen:
            return r
        # A close frame of at most 125 bytes is judged whole, whatever the length's form.
        size = (int.from_bytes(data[pos + 2:pos + 4], "big") if n == 126 else
                int.from_bytes(data[pos + 2:pos + 10], "big") if n == 127 else n)
        if opcode == 8 and size <= 125 and len(data) - pos < hlen + size:
            return r
        if rsv:
            return fail(1002, "reserved bits set (no extension was negotiated)")
        if 2 < opcode < 8 or opcode > 10:
            return fail(1002, f"reserved opcode {opcode}")
        if bool(has_mask) != masked:
            return fail(1002, "unmasked frame from the client" if masked
                        else "masked frame from the upstream")
        if n == 126:
            n = int.from_bytes(data[pos + 2:pos + 4], "big")
        elif n == 127:
            if data[pos + 2] & 0x80:
                return fail(1002, "64-bit payload length with the top bit set")
            n = int.from_bytes(data[pos + 2:pos + 10], "big")
        if opcode >= 8:
            if not fin:
                return fail(1002, "fragmented control frame")
            if n > 125:
                return fail(1002, "control frame payload over 125 bytes")
        else:
            if opcode == 0 and not fragmented:
                return fail(1002, "continuation frame without a message to continue")
            if opcode != 0:
                if fragmented:
                    return fail(1002, "new data message inside a fragmented message")
                message = 0
            if n > max_message - message:
                return fail(1009, f"message over {max_message} bytes")
            message += n
            fragmented = not fin
        key = data[pos + hlen - 4:pos + hlen] if has_mask else b"\0\0\0\0"
        payload_all = data[pos + hlen:pos + hlen + n]
        if opcode == 8:
            body = bytes(b ^ key[i & 3] for i, b in enumerate(payload_all))
            if n == 1:
                return fail(1002, "close frame with a 1-byte payload")
            if n >= 2:
                code = int.from_bytes(body[:2], "big")
                if code not in VALID_CLOSE:
                    return fail(1002, f"invalid close code {code}")
                try:
                    body[2:].decode()
                except UnicodeDecodeError:
                    return fail(1007, "invalid UTF-8 in close reason")
        end = pos + hlen + n
        k = KIND[opcode]
        r.frames[k] += 1
        r.payload[k] += n
        r.wire += hlen + n
        r.output += data[pos:min(end, len(data))]
        if markers and opcode < 3:
            if opcode == 1 or (opcode == 2 and binary):
                text = b""
            elif opcode == 2:
                text = None
            if text is not None:
                text += payload_all                 # unmasked direction only
        if end > len(data):
            return r                                # payload still arriving (cut-through)
        r.boundaries.append(end)
        if markers and opcode < 3 and fin and text is not None:
            if window == 0:
                found = [text.find(m) for m in markers if m in text]
                if found:
                    r.metered.append(text[min(found):])
            elif any(m in text[:window] for m in markers):
                r.metered.append(text)
            text = None
        if opcode == 8:
            return r                                # RFC 6455 1.4: what follows is discarded
        pos = end
