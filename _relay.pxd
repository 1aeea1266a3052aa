# C-level declarations of the relay core (see _relay.pyx for the contract and the
# leg state diagram).

from libc.stdint cimport uint8_t, uint16_t, uint64_t

cdef extern from "_tls.h":
    ctypedef struct SSL:
        pass

cdef enum:
    # Longest frame header: 2 + 8 (64-bit length) + 4 (mask key).
    HEADER_MAX = 14
    # A close frame is held whole (header + at most 125 payload bytes) to validate it.
    HELD_MAX = 139
    # Bytes at the start of a metered message searched for the markers: default, limit.
    SNIFF_DEFAULT = 256
    SNIFF_LIMIT = 8192
    # Frame kinds, indexes into the counters: continuation, text, binary, close, ping, pong.
    KINDS = 6
    # Directions: client to upstream, upstream to client.
    C2U = 0
    U2C = 1


# Close codes, named once: the sidecar's own (DESIGN.md's table) and the RFC 6455
# codes the relay reads or reports. `str(CloseCode.X)` is the number.
cpdef enum CloseCode:
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    NO_STATUS = 1005            # a close frame without a code (never sent)
    CONNECTION_LOST = 1006      # no close frame at all (never sent)
    INVALID_DATA = 1007
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    AT_CAPACITY = 1013
    UPSTREAM_FAILED = 1014
    AUTH_FAILED = 4001
    BUDGET_EXHAUSTED = 4002
    FORBIDDEN = 4003
    NO_ROUTE = 4004
    SESSION_TIME_LIMIT = 4008
    KEY_LIMIT = 4029


# The closing handshake of one leg (see the diagram in _relay.pyx).
cpdef enum LegState:
    OPEN = 0
    CLOSE_RECEIVED = 1      # the peer's close came; ours (or the other peer's) is owed
    FAILED = 2              # the peer violated the protocol; it is owed our close
    CLOSE_QUEUED = 3        # our close waits for the frame in flight to this peer
    CLOSE_QUEUED_LAST = 4   # the same, and the socket is shut once it is out
    CLOSE_SENT = 5          # a close went to the peer; its close is awaited
    CLOSED = 6              # both closes passed; the socket is shut next loop turn
    SHUT = 7                # transport.close()/abort() called: nothing more is written
    LOST = 8                # connection_lost seen


cdef class Endpoint:
    """What a pipe writes to and reports to: a socket (Leg) or, in tests and
    benchmarks, a Recorder. It is also a pipe's source, for the forwarding rules."""
    cdef readonly LegState state
    cdef bint at_frame_end     # frame_end() is wanted at the pipe's next frame boundary

    cdef int set_state(self, LegState new) except -1
    cdef int write(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef int frame_end(self, Pipe pipe, Py_ssize_t pos) except -1
    cdef int close_frame(self, Pipe pipe, int code, object reason,
                         Py_ssize_t size) except -1   # size: the frame's bytes on the wire
    cdef int violation(self, Pipe pipe, int code, str reason) except -1
    cdef int metered(self, Pipe pipe, bytes message) except -1


cdef class Leg(Endpoint):
    """One socket of a session: the asyncio protocol its transport calls."""
    # Flags are bytes, grouped: idle sessions are held by the thousand (see Pipe).
    cdef int fd                # -1 when writes must go through the transport (uvloop's TLS)
    cdef uint8_t kernel_tx     # a TLS leg whose sends the kernel encrypts (OpenSSL only decrypts)
    cdef uint8_t backlog       # the transport holds unsent bytes: keep order, write through it
    cdef uint8_t peer_left     # its peer was seen to reset or leave: the session's end is its,
                               # what is sent to it dropped
    cdef Relay relay
    cdef Pipe inbound          # frames read from this socket
    cdef Pipe outbound         # frames written to this socket
    cdef object transport
    cdef SSL* ssl              # a TLS leg the relay encrypts itself (NULL: plain, or uvloop's)
    cdef object tls            # the ssl.SSLObject that owns `ssl` (kept as long as the leg)
    cdef bytes queued_notice   # a text frame to send just before queued_close
    cdef bytes queued_close    # our close frame, waiting for the frame in flight to end

    cdef bytes attach(self, Relay relay, object transport, Pipe inbound, Pipe outbound,
                      object tls, bint kernel_tx)
    cdef bytes take_tls(self, object tls)
    cdef int send_raw(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef int read_tls(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef bint ended_after_close(self)
    cdef int flush_tls(self) except -1
    cdef int shut(self) except -1
    cdef bint may_send(self)
    cdef int bound_close(self) except -1
    cdef int drop(self) except -1
    cdef int left_behind(self) except -1


cdef class Recorder(Endpoint):
    """The scanner's sink: forwarded bytes, frame ends and metered messages."""
    cdef bytearray output      # None: count only (benchmarks)
    cdef list boundaries
    cdef list messages
    cdef uint64_t offset       # stream offset of the read being scanned


cdef struct Header:
    uint64_t length            # payload bytes
    Py_ssize_t size            # header bytes, mask key included
    int opcode
    bint fin
    bint masked
    bint top_bit               # a 64-bit length with its top bit set (invalid)


cdef class Pipe:
    """One direction: scans frame headers from `src`, forwards bytes to `dst`."""
    # Flags and small numbers are bytes, grouped at the end, not a C int each with
    # padding between: two pipes per session, held by every idle one.
    cdef uint64_t max_message
    cdef Endpoint src
    cdef Endpoint dst
    cdef uint8_t* held         # HELD_MAX bytes, allocated at the first split frame start
    cdef Py_ssize_t nheld
    cdef uint64_t left         # payload bytes of the current frame still to come
    cdef uint64_t message_bytes
    cdef readonly object verdict_reason
    cdef uint64_t frames[KINDS]
    cdef uint64_t payload[KINDS]
    cdef uint64_t wire_bytes
    # Usage metering: the start of each text (optionally binary) message is sniffed for
    # any of the markers (or, window 0, the whole message is searched as it passes);
    # only messages that have one are captured and handed to dst.
    cdef tuple markers
    cdef uint8_t* sniff        # `window` bytes, allocated while a message start is sniffed
    cdef Py_ssize_t window     # 0: whole messages are searched (`seek`), not their start
    cdef Py_ssize_t nsniff
    cdef bytearray capture
    # Read whole (the client's, in a session whose later messages are checked): each
    # text message is captured unmasked and withheld (`pending`, its raw bytes and the
    # control frames between its fragments) until dst has judged it.
    cdef bytearray pending     # withheld raw bytes of the message being read whole
    cdef readonly int verdict_code
    cdef uint16_t reach        # window 0: the longest marker's length
    cdef uint8_t mask[4]       # the metered frame's mask key
    cdef uint8_t direction     # C2U or U2C; DISCARDED: a Scanner, counted in no process total
    cdef uint8_t masked        # frames in this direction must be masked (client to server)
    cdef uint8_t forwarding    # the current frame goes to dst (else it is dropped)
    cdef uint8_t fragmented    # inside a fragmented data message
    cdef uint8_t ended         # src's close frame passed: what follows is discarded unread
    cdef uint8_t dst_left      # dst's peer is gone (Leg.peer_left): what goes on is dropped, uncounted
    cdef uint8_t meter_binary  # metering: binary messages are sniffed too
    cdef uint8_t meter_state   # metering: METER_IDLE, _SNIFF, _CAPTURE or _SEEK
    cdef uint8_t message_end   # the current frame ends a data message
    cdef uint8_t data_frame    # the current frame is a data frame (not control)
    cdef uint8_t read_whole    # text messages are read whole (see pending)
    cdef uint8_t mask_phase    # the metered frame's payload bytes metered so far, mod 4

    cdef int set_metering(self, tuple markers, bint binary, Py_ssize_t window) except -1
    cdef int feed(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef int start_frame(self, const uint8_t* h, Header* f, Py_ssize_t have) except -1
    cdef int emit(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef int violation(self, int code, str reason) except -1
    cdef int meter(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef int seek(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef Py_ssize_t first_marker(self, const uint8_t* data, Py_ssize_t size) noexcept
    cdef void unmask(self, uint8_t* data, Py_ssize_t size) noexcept
    cdef bytes metered_message(self)
    cdef int meter_done(self, bytes message) except -1
    cdef int release(self, bint deliver) except -1
    cdef int read_whole_up_to(self, uint64_t limit) except -1
    cdef void release_sniff(self) noexcept
    cdef bint marked(self)


cdef class Relay:
    cdef readonly Leg client
    cdef readonly Leg upstream
    cdef Pipe c2u
    cdef Pipe u2c
    cdef object loop
    cdef object on_done
    cdef public object on_message
    cdef object on_client_message
    cdef object deadline
    cdef double close_timeout
    cdef readonly object closed_by
    cdef readonly object close_code
    cdef readonly object close_reason
    cdef str fail_reason
    cdef int fail_code             # a peer's violation, told to it once the other peer closed
    cdef bint done
    cdef public object session

    cdef int on_close_frame(self, Pipe pipe, int code, object reason, Py_ssize_t size) except -1
    cdef int on_violation(self, Pipe pipe, int code, str reason) except -1
    cdef int send_close(self, Leg leg, int code, str reason, bint finish,
                        bytes notice=*) except -1
    cdef int on_lost(self, Leg leg) except -1
    cdef int arm_deadline(self) except -1
