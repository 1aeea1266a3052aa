# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The relay core: forwards WebSocket frames verbatim between two sockets.

Only frame headers are read. Payload bytes go from the read buffer to the other
socket untouched (client frames stay masked, provider frames stay unmasked), as
they arrive (cut-through). A header is held until it is complete and valid; a close
frame is held whole (at most 139 bytes) so its code and reason can be checked.

One read buffer serves every session of the process: a read's bytes are either
sent to the kernel at once or copied by the transport (only what the kernel did
not take), so nothing refers to the buffer once `buffer_updated` returns.

Per frame the code touches C fields only; Python objects appear per read (at most
one bytes object for an unsent tail) and at session boundaries (close frames,
violations, connection loss).
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

cdef extern from "<string.h>" nogil:
    void* memmem(const void* haystack, size_t hn, const void* needle, size_t nn)
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    enum: MSG_NOSIGNAL
    enum: MSG_DONTWAIT

# Seconds the other peer may still send after a violation, before it gets our close.
cdef double VIOLATION_GRACE = 0.1

cdef enum:
    READ_SIZE = 262144
    COPY_PIECE = 65536
    HIST_BUCKETS = 12
    # Metering states of a pipe.
    METER_IDLE = 0
    METER_SNIFF = 1
    METER_CAPTURE = 2
    CAPTURE_MAX = 4 * 1024 * 1024

# Shared by all sessions; see the module docstring.
cdef bytearray _read_buffer = bytearray(READ_SIZE)
cdef uint8_t* _read_ptr = <uint8_t*>PyByteArray_AS_STRING(_read_buffer)

# Process totals, read by the metrics collector at scrape time.
cdef uint64_t g_frames[2][KINDS]
cdef uint64_t g_payload[2][KINDS]
cdef uint64_t g_wire[2]
cdef uint64_t g_hist[HIST_BUCKETS + 1]
cdef uint64_t g_hist_sum_ns = 0
cdef uint64_t[HIST_BUCKETS] HIST_BOUNDS_NS = [
    1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
    1000000, 5000000, 25000000]

KIND_NAMES = ("continuation", "text", "binary", "close", "ping", "pong")
DIRECTION_NAMES = ("client_to_upstream", "upstream_to_client")
HISTOGRAM_BOUNDS = tuple(HIST_BOUNDS_NS[i] / 1e9 for i in range(HIST_BUCKETS))  # seconds

# Close codes a peer may put on the wire (RFC 6455 7.4, IANA registry).
cdef inline bint valid_close_code(int code):
    return (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999)

cdef inline int kind_of(int opcode):
    return opcode if opcode < 3 else opcode - 5

cdef inline uint64_t now_ns():
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec

cdef inline void observe(uint64_t ns):
    global g_hist_sum_ns
    cdef int i = 0
    while i < HIST_BUCKETS and ns > HIST_BOUNDS_NS[i]:
        i += 1
    g_hist[i] += 1
    g_hist_sum_ns += ns


cdef Py_ssize_t frame_need(const uint8_t* h, Py_ssize_t have):
    """Bytes needed from a frame's start before it can be judged: the header, or
    for a close frame the whole frame."""
    cdef Py_ssize_t hlen, plen
    if have < 2:
        return 2
    hlen = 2 + (4 if h[1] & 0x80 else 0)
    plen = h[1] & 0x7F
    if plen == 126:
        hlen += 2
    elif plen == 127:
        hlen += 8
    if (h[0] & 0x0F) != 8:
        return hlen
    if plen > 125:
        # A close frame's length in the 16- or 64-bit form (not minimal, but a short
        # payload is still judged whole): decode it once the header is here.
        if have < hlen:
            return hlen
        if plen == 126:
            plen = (<Py_ssize_t>h[2] << 8) | h[3]
        elif h[2] | h[3] | h[4] | h[5] | h[6] | h[7]:
            return hlen             # over 125 bytes (or the top bit): start_frame says so
        else:
            plen = (<Py_ssize_t>h[8] << 8) | h[9]
        if plen > 125:
            return hlen
    return hlen + plen


def close_frame(int code, str reason, bint masked):
    """A close frame carrying `code` and `reason` (truncated to fit 125 bytes)."""
    cdef bytes payload = code.to_bytes(2, "big") + reason.encode()[:123]
    while True:     # never cut a UTF-8 sequence in two
        try:
            payload[2:].decode()
            break
        except UnicodeDecodeError:
            payload = payload[:len(payload) - 1]
    if not masked:
        return bytes((0x88, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x88, 0x80 | len(payload))) + key + bytes(
        b ^ key[i & 3] for i, b in enumerate(payload))


cdef class Leg:

    def __cinit__(self):
        self.fd = -1

    cdef int attach(self, Relay relay, object transport, Pipe inbound, Pipe outbound) except -1:
        self.relay = relay
        self.transport = transport
        self.inbound = inbound
        self.outbound = outbound
        self.write_buffer_size = transport.get_write_buffer_size
        # TLS transports encrypt what they are given: no file descriptor to write to.
        if transport.get_extra_info("sslcontext") is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self.fd = sock.fileno()
        transport.set_write_buffer_limits(high=65536)
        transport.set_protocol(self)
        # What the transport still holds (the 101; uvloop < 0.20 queues every write until
        # the loop turns) must go first: write through it until it is empty.
        self.backlog = True
        return 0

    cdef int write(self, const uint8_t* data, Py_ssize_t size) except -1:
        cdef ssize_t sent
        cdef Py_ssize_t piece
        if self.closing or size <= 0:
            return 0
        if self.fd >= 0:
            if self.backlog and self.write_buffer_size() == 0:
                self.backlog = False
            if not self.backlog:
                sent = send(self.fd, data, size, MSG_NOSIGNAL | MSG_DONTWAIT)
                if sent == size:
                    return 0
                if sent < 0:
                    if errno != EAGAIN and errno != EINTR:   # EWOULDBLOCK is EAGAIN on Linux
                        # The peer is gone; connection_lost will follow.
                        self.closing = True
                        self.transport.abort()
                        return 0
                    sent = 0
                data += sent
                size -= sent
        # The transport keeps (or, for TLS, encrypts) a copy. Pieces of at most 64 KiB
        # come from the malloc heap; larger ones would be fresh mmaps, page-faulted in
        # and returned on every read.
        while size > 0:
            piece = min(size, COPY_PIECE)
            self.transport.write(PyBytes_FromStringAndSize(<char*>data, piece))
            data += piece
            size -= piece
        self.backlog = True
        return 0

    cdef int shut(self) except -1:
        if not self.closing:
            self.closing = True
            self.transport.close()
        return 0

    # asyncio (buffered) protocol

    def get_buffer(self, Py_ssize_t sizehint):
        return _read_buffer

    def buffer_updated(self, Py_ssize_t nbytes):
        if self.failed or self.relay is None or self.relay.done:
            return
        cdef uint64_t t0 = now_ns()
        self.inbound.feed(_read_ptr, nbytes)
        observe(now_ns() - t0)

    def eof_received(self):
        return False    # a half-closed peer ends the session: close the transport

    def pause_writing(self):
        if self.outbound is None:
            return      # the session is over
        cdef Leg src = self.outbound.src
        if not (src.lost or src.closing):
            src.transport.pause_reading()

    def resume_writing(self):
        if self.outbound is None:
            return
        cdef Leg src = self.outbound.src
        if not (src.lost or src.closing or src.failed):
            src.transport.resume_reading()

    def connection_lost(self, exc):
        # A local reference: on_lost may drop the relay's last one (it breaks cycles).
        cdef Relay relay = self.relay
        self.lost = True
        self.closing = True
        relay.on_lost(self)


cdef class Pipe:

    def __init__(self, int direction, bint masked, uint64_t max_message):
        self.direction = direction
        self.masked = masked
        self.max_message = max_message

    cdef int emit(self, const uint8_t* data, Py_ssize_t size) except -1:
        if size <= 0:
            return 0
        if self.dst is not None:
            self.dst.write(data, size)
        elif self.sink is not None:
            self.sink += PyBytes_FromStringAndSize(<char*>data, size)
        return 0

    cdef int violation(self, int code, str reason) except -1:
        self.verdict_code = code
        self.verdict_reason = reason
        if self.src is not None:
            self.src.relay.on_violation(self, code, reason)
        return 0

    cdef int start_frame(self, const uint8_t* h, Py_ssize_t have) except -1:
        """Judge a frame from its first `have` bytes (its header, or a whole close
        frame). Returns 1 on a violation (already reported), else 0."""
        cdef int fin = h[0] & 0x80, opcode = h[0] & 0x0F, masked = h[1] & 0x80
        cdef uint64_t plen = h[1] & 0x7F
        cdef Py_ssize_t hlen = 2, i
        cdef int code = 0
        cdef uint8_t p0, p1
        cdef object reason = None
        cdef bint forward
        if h[0] & 0x70:
            return self.violation(1002, "reserved bits set (no extension was negotiated)") + 1
        if 2 < opcode < 8 or opcode > 10:
            return self.violation(1002, "reserved opcode %d" % opcode) + 1
        if bool(masked) != self.masked:
            return self.violation(1002, "unmasked frame from the client" if self.masked
                                  else "masked frame from the upstream") + 1
        if plen == 126:
            plen = (<uint64_t>h[2] << 8) | h[3]
            hlen = 4
        elif plen == 127:
            if h[2] & 0x80:
                return self.violation(1002, "64-bit payload length with the top bit set") + 1
            plen = 0
            for i in range(2, 10):
                plen = (plen << 8) | h[i]
            hlen = 10
        if masked:
            hlen += 4
        if opcode >= 8:
            if not fin:
                return self.violation(1002, "fragmented control frame") + 1
            if plen > 125:
                return self.violation(1002, "control frame payload over 125 bytes") + 1
        else:
            if opcode == 0:
                if not self.fragmented:
                    return self.violation(1002, "continuation frame without a message to continue") + 1
            else:
                if self.fragmented:
                    return self.violation(1002, "new data message inside a fragmented message") + 1
                self.message_bytes = 0
            if plen > self.max_message - self.message_bytes:
                return self.violation(1009, "message over %d bytes" % self.max_message) + 1
            self.message_bytes += plen
            self.fragmented = not fin
            if self.marker is not None and opcode != 0:
                self.meter_state = METER_SNIFF if opcode == 1 else METER_IDLE
                self.nsniff = 0
        self.message_end = fin and opcode < 8
        self.data_frame = opcode < 8
        if opcode == 8:
            if plen == 1:
                return self.violation(1002, "close frame with a 1-byte payload") + 1
            if plen >= 2:
                p0 = h[hlen]
                p1 = h[hlen + 1]
                if masked:
                    p0 ^= h[hlen - 4]
                    p1 ^= h[hlen - 3]
                code = (p0 << 8) | p1
                if not valid_close_code(code):
                    return self.violation(1002, "invalid close code %d" % code) + 1
                raw = bytearray(h[hlen + 2:hlen + plen])
                if masked:
                    for i in range(len(raw)):
                        raw[i] ^= h[hlen - 4 + ((i + 2) & 3)]
                try:
                    reason = raw.decode()
                except UnicodeDecodeError:
                    return self.violation(1007, "invalid UTF-8 in close reason") + 1
            else:
                code = 1005     # no status code present (RFC 6455 7.1.5); never sent
                reason = ""
        if self.src is not None:
            # A violator gets the sidecar's close, not the other peer's reply.
            forward = not (self.src.close_received or self.dst.close_sent
                           or (opcode == 8 and self.dst.failed))
        else:
            forward = self.verdict_code == 0 and not self.frames[3]
        self.forwarding = forward
        self.left = plen - <uint64_t>(have - hlen)
        if forward:
            i = kind_of(opcode)
            self.frames[i] += 1
            self.payload[i] += plen
            self.wire_bytes += hlen + plen
            g_frames[self.direction][i] += 1
            g_payload[self.direction][i] += plen
            g_wire[self.direction] += hlen + plen
        if opcode == 8 and self.src is not None:
            self.src.relay.on_close_frame(self, code, reason)
        return 0

    cdef int feed(self, const uint8_t* p, Py_ssize_t n) except -1:
        """Scan and forward `n` bytes read from src."""
        cdef Py_ssize_t pos = 0, run = 0, need, take
        cdef Leg dst = self.dst
        while pos < n:
            if self.left:
                take = <Py_ssize_t>min(self.left, <uint64_t>(n - pos))
                if self.meter_state and self.data_frame:    # not a ping between fragments
                    self.meter(p + pos, take)
                if not self.forwarding:
                    self.emit(p + run, pos - run)
                    run = pos + take
                pos += take
                self.left -= take
            elif self.nheld:
                # A frame start split across reads: complete it in `held`.
                need = frame_need(self.held, self.nheld)
                while self.nheld < need and pos < n:
                    take = min(need - self.nheld, n - pos)
                    memcpy(self.held + self.nheld, p + pos, take)
                    self.nheld += take
                    pos += take
                    need = frame_need(self.held, self.nheld)
                run = pos
                if self.nheld < need:
                    break
                if self.start_frame(self.held, need):
                    return 0
                if self.forwarding:
                    self.emit(self.held, need)
                self.nheld = 0
            else:
                need = frame_need(p + pos, n - pos)
                if n - pos < need:
                    self.emit(p + run, pos - run)
                    memcpy(self.held, p + pos, n - pos)
                    self.nheld = n - pos
                    run = pos = n
                    break
                if self.start_frame(p + pos, need):
                    self.emit(p + run, pos - run)
                    return 0
                if not self.forwarding:
                    self.emit(p + run, pos - run)
                    run = pos + need
                pos += need
            if self.left == 0 and self.nheld == 0:
                # A frame boundary: where the relay's own close frame may go.
                if self.boundaries is not None:
                    self.boundaries.append(self.offset + <uint64_t>pos)
                if self.message_end:
                    self.message_end = False
                    if self.meter_state:
                        self.meter_done()
                if dst is not None and dst.pending_close is not None:
                    self.emit(p + run, pos - run)
                    run = pos
                    frame = dst.pending_close
                    dst.pending_close = None
                    dst.write(<uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
                    self.src.relay.check_leg(dst)
        self.emit(p + run, pos - run)
        self.offset += <uint64_t>n
        return 0

    cdef int meter(self, const uint8_t* data, Py_ssize_t size) except -1:
        """Payload bytes of a text message: sniff its start, capture it if marked."""
        cdef Py_ssize_t take
        if self.meter_state == METER_SNIFF:
            take = min(size, SNIFF_MAX - self.nsniff)
            memcpy(self.sniff + self.nsniff, data, take)
            self.nsniff += take
            if self.nsniff < SNIFF_MAX:
                return 0
            if not self.marked():
                self.meter_state = METER_IDLE
                return 0
            self.meter_state = METER_CAPTURE
            self.capture = bytearray(self.sniff[:self.nsniff])
            data += take
            size -= take
        if len(self.capture) + size > CAPTURE_MAX:
            self.meter_state = METER_IDLE      # far larger than any usage event
            self.capture = None
        elif size > 0:
            self.capture += data[:size]
        return 0

    cdef bint marked(self):
        return memmem(self.sniff, self.nsniff, PyBytes_AS_STRING(self.marker),
                      PyBytes_GET_SIZE(self.marker)) != NULL

    cdef int meter_done(self) except -1:
        """A text message ended: hand it to Python if it carries the marker."""
        cdef object message = None
        if self.meter_state == METER_SNIFF and self.marked():
            message = self.sniff[:self.nsniff]
        elif self.meter_state == METER_CAPTURE:
            message = bytes(self.capture)
        self.meter_state = METER_IDLE
        self.capture = None
        if message is None:
            return 0
        if self.src is None:
            if self.messages is not None:
                self.messages.append(message)
        elif self.src.relay.on_message is not None:
            self.src.relay.on_message(self.src.relay, message)
        return 0

    def counters(self):
        """(frames per kind, payload bytes per kind, wire bytes)."""
        return (tuple(self.frames[i] for i in range(KINDS)),
                tuple(self.payload[i] for i in range(KINDS)), self.wire_bytes)


cdef class Scanner(Pipe):
    """The relay's scanner without sockets, for tests and benchmarks: forwarded
    bytes go to `output`, frame ends to `boundaries`."""

    def __init__(self, bint masked, uint64_t max_message=1 << 62, bint record=True,
                 bytes marker=None):
        self.masked = masked
        self.max_message = max_message
        self.marker = marker
        if record:
            self.sink = bytearray()
            self.boundaries = []
            self.messages = []

    def feed_bytes(self, const uint8_t[:] data):
        if data.shape[0] and self.verdict_code == 0:
            self.feed(&data[0], data.shape[0])

    @property
    def output(self):
        return bytes(self.sink)

    @property
    def frame_boundaries(self):
        return list(self.boundaries)

    @property
    def metered(self):
        return list(self.messages)


def scan_benchmark(bytes data, bint masked, int repeat):
    """Scan `data` (whole frames) `repeat` times on the relay's path; frames seen."""
    cdef Scanner s = Scanner(masked, record=False)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef int i
    for i in range(repeat):
        s.feed(p, n)
    return sum(s.frames[k] for k in range(KINDS))


cdef class Relay:
    """Two legs and two pipes. `start` hands both transports over; `close` sends the
    sidecar's own close frames; `on_done(relay)` is called once both sockets are gone."""


    def __init__(self, loop, uint64_t max_message, double close_timeout, on_done,
                 bytes marker=None, on_message=None):
        self.loop = loop
        self.on_done = on_done
        self.close_timeout = close_timeout
        self.client = Leg()
        self.upstream = Leg()
        self.c2u = Pipe(C2U, True, max_message)
        self.u2c = Pipe(U2C, False, max_message)
        # Text messages from the provider that contain `marker` go to on_message(relay, bytes).
        self.u2c.marker = marker
        self.on_message = on_message
        self.c2u.src = self.u2c.dst = self.client
        self.c2u.dst = self.u2c.src = self.upstream

    def start(self, client_transport, upstream_transport, bytes client_early=b"",
              bytes upstream_early=b""):
        """Take over both transports; forward bytes already read past each handshake."""
        self.client.attach(self, client_transport, self.c2u, self.u2c)
        self.upstream.attach(self, upstream_transport, self.u2c, self.c2u)
        if upstream_early:
            self.u2c.feed(<uint8_t*>PyBytes_AS_STRING(upstream_early), len(upstream_early))
        if client_early and not self.done:
            self.c2u.feed(<uint8_t*>PyBytes_AS_STRING(client_early), len(client_early))

    def close(self, int client_code, str client_reason, int upstream_code, str upstream_reason):
        """Close both sides with the sidecar's own close frames (shutdown, revoked key)."""
        if self.closed_by is None:
            self.closed_by, self.close_code, self.close_reason = "sidecar", client_code, client_reason
        self.send_close(self.client, client_code, client_reason, False)
        self.send_close(self.upstream, upstream_code, upstream_reason, False)

    def abort(self):
        """Drop both connections now, without closing handshakes."""
        for leg in (self.client, self.upstream):
            if leg.transport is not None and not leg.lost:
                leg.closing = True
                leg.transport.abort()

    def counters(self, int direction):
        return (self.c2u if direction == C2U else self.u2c).counters()

    @property
    def finished(self):
        return self.done

    @property
    def activity(self):
        """Frames relayed so far, both ways (for idle detection)."""
        cdef int k
        cdef uint64_t n = 0
        for k in range(KINDS):
            n += self.c2u.frames[k] + self.u2c.frames[k]
        return n

    cdef int send_close(self, Leg leg, int code, str reason, bint finish) except -1:
        if finish:
            leg.finish = True
        if leg.lost or leg.closing:
            return 0
        if leg.close_sent:
            return self.check_leg(leg)
        leg.close_sent = True
        frame = close_frame(code, reason, leg is self.upstream)
        if leg.outbound.left:
            leg.pending_close = frame        # after the frame in flight
            if leg.outbound.src.lost:
                leg.closing = True           # that frame will never end
                leg.transport.abort()
        else:
            leg.write(<uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
            self.check_leg(leg)
        return self.arm_deadline()

    cdef int check_leg(self, Leg leg) except -1:
        """Close a leg's socket once its closing handshake is over (or it must end)."""
        if leg.close_sent and leg.pending_close is None and (leg.close_received or leg.finish):
            leg.shut()
        return 0

    cdef int on_close_frame(self, Pipe pipe, int code, object reason) except -1:
        cdef Leg src = pipe.src, dst = pipe.dst
        if self.closed_by is None:
            self.closed_by = "client" if src is self.client else "upstream"
            self.close_code, self.close_reason = code, reason
        src.close_received = True
        if pipe.forwarding:
            dst.close_sent = True
        elif dst.failed:
            # The other peer has answered our close: now tell the violator why.
            self.send_close(dst, self.fail_code, self.fail_reason, True)
        self.arm_deadline()
        # The frame itself is emitted after this returns; shut the sockets after it.
        self.loop.call_soon(self._after_close_frame)
        return 0

    def _after_close_frame(self):
        self.check_leg(self.client)
        self.check_leg(self.upstream)

    cdef int on_violation(self, Pipe pipe, int code, str reason) except -1:
        """Nothing more is read from the violator. The other peer is closed first (after
        VIOLATION_GRACE), and what it still sends (e.g. the answer to the violator's
        last good message) is delivered until its close arrives; then the violator
        gets `code`."""
        cdef Leg src = pipe.src
        side = "client" if src is self.client else "upstream"
        reason = "%s: %s" % (side, reason)
        if self.closed_by is None:
            self.closed_by, self.close_code, self.close_reason = "sidecar", code, reason
        self.fail_code, self.fail_reason = code, reason
        src.failed = True
        if not src.closing:
            src.transport.pause_reading()
        if pipe.dst.close_sent or pipe.dst.lost:
            self.send_close(src, code, reason, True)
        else:
            # A moment for the other peer to answer what it already received (a
            # client's last good message, say) before it is told to close.
            self.loop.call_later(VIOLATION_GRACE, self._close_after_violation, pipe.dst)
            self.arm_deadline()
        return 0

    def _close_after_violation(self, Leg leg):
        self.send_close(leg, self.fail_code, self.fail_reason, False)

    cdef int on_lost(self, Leg leg) except -1:
        cdef Leg other = self.upstream if leg is self.client else self.client
        if not other.lost:
            if other.pending_close is not None:
                # Our close waits for a frame from the lost leg that will never end.
                other.closing = True
                other.transport.abort()
            elif not (leg.close_sent and leg.close_received):
                if self.closed_by is None:
                    if leg is self.client:
                        self.closed_by, self.close_code = "client", 1006
                        self.close_reason = "client connection lost"
                    else:
                        self.closed_by, self.close_code = "upstream", 1006
                        self.close_reason = "upstream connection lost"
                if other.failed:
                    self.send_close(other, self.fail_code, self.fail_reason, True)
                elif leg is self.client:
                    self.send_close(other, 1001, "client went away", True)
                else:
                    self.send_close(other, 1014, "upstream connection lost", True)
            else:
                other.finish = True
                self.check_leg(other)
            return 0
        self.done = True
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        cb, self.on_done = self.on_done, None
        if cb is not None:
            cb(self)
        # Break the relay <-> legs <-> pipes cycles: the session is freed by reference
        # counting, not left to the cyclic GC.
        self.on_message = None
        self.session = None
        for leg in (self.client, self.upstream):
            leg.relay = None
            leg.inbound = leg.outbound = None
        self.c2u.src = self.c2u.dst = self.u2c.src = self.u2c.dst = None
        return 0

    cdef int arm_deadline(self) except -1:
        if self.deadline is None and not self.done:
            self.deadline = self.loop.call_later(self.close_timeout, self._deadline)
        return 0

    def _deadline(self):
        """The close timeout: both connections are dropped, but a violator still
        owed its close code (the other peer never answered ours) gets it first, if
        the frames to it are at a boundary."""
        cdef Leg leg
        for leg in (self.client, self.upstream):
            if (leg.failed and not leg.close_sent and not (leg.lost or leg.closing)
                    and leg.outbound is not None and leg.outbound.left == 0):
                leg.close_sent = True
                frame = close_frame(self.fail_code, self.fail_reason, leg is self.upstream)
                leg.write(<uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
        self.abort()


def totals():
    """Process totals: (frames[dir][kind], payload[dir][kind], wire[dir],
    histogram bucket counts, histogram sum in seconds)."""
    return (tuple(tuple(g_frames[d][k] for k in range(KINDS)) for d in range(2)),
            tuple(tuple(g_payload[d][k] for k in range(KINDS)) for d in range(2)),
            tuple(g_wire[d] for d in range(2)),
            tuple(g_hist[i] for i in range(HIST_BUCKETS + 1)),
            g_hist_sum_ns / 1e9)
