# C-level declarations of the relay core (see _relay.pyx for the contract).

from libc.stdint cimport uint8_t, uint64_t

cdef enum:
    # Longest frame header: 2 + 8 (64-bit length) + 4 (mask key).
    HEADER_MAX = 14
    # A close frame is held whole (header + at most 125 payload bytes) to validate it.
    HELD_MAX = 139
    # Bytes at the start of a text message searched for the usage marker.
    SNIFF_MAX = 256
    # Frame kinds, indexes into the counters: continuation, text, binary, close, ping, pong.
    KINDS = 6
    # Directions: client to upstream, upstream to client.
    C2U = 0
    U2C = 1


cdef class Leg:
    """One socket of a session: the asyncio protocol its transport calls."""
    cdef Relay relay
    cdef Pipe inbound          # frames read from this socket
    cdef Pipe outbound         # frames written to this socket
    cdef object transport
    cdef object write_buffer_size
    cdef int fd                # -1 when writes must go through the transport (TLS)
    cdef bint backlog          # the transport holds unsent bytes: keep order, write through it
    cdef bint lost             # connection_lost seen
    cdef bint closing          # transport.close()/abort() called: write nothing more
    cdef bint failed           # this peer violated the protocol: read nothing more from it
    cdef bint close_sent       # a close frame was sent (or queued) to this peer
    cdef bint close_received   # this peer sent a close frame
    cdef bint finish           # close the transport as soon as our close frame is out
    cdef bytes pending_close   # our close frame, waiting for the frame in flight to end

    cdef int attach(self, Relay relay, object transport, Pipe inbound, Pipe outbound) except -1
    cdef int write(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef int shut(self) except -1


cdef class Pipe:
    """One direction: scans frame headers from `src`, forwards bytes to `dst`."""
    cdef int direction
    cdef bint masked           # frames in this direction must be masked (client to server)
    cdef uint64_t max_message
    cdef Leg src
    cdef Leg dst
    cdef object sink           # scanner mode (tests, benchmarks): bytearray or None
    cdef list boundaries       # scanner mode: stream offset at the end of each frame
    cdef uint64_t offset       # bytes consumed so far (scanner mode bookkeeping)
    cdef uint8_t held[HELD_MAX]
    cdef Py_ssize_t nheld
    cdef uint64_t left         # payload bytes of the current frame still to come
    cdef bint forwarding       # the current frame goes to dst (else it is dropped)
    cdef bint fragmented       # inside a fragmented data message
    cdef uint64_t message_bytes
    cdef readonly int verdict_code
    cdef readonly object verdict_reason
    cdef uint64_t frames[KINDS]
    cdef uint64_t payload[KINDS]
    cdef uint64_t wire_bytes
    # Usage metering (upstream to client): the start of each text message is sniffed
    # for a marker; only messages that have it are captured and handed to Python.
    cdef bytes marker
    cdef int meter_state
    cdef bint message_end      # the current frame ends a data message
    cdef bint data_frame       # the current frame is a data frame (not control)
    cdef uint8_t sniff[SNIFF_MAX]
    cdef Py_ssize_t nsniff
    cdef bytearray capture
    cdef list messages         # scanner mode: metered messages

    cdef int feed(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef int start_frame(self, const uint8_t* h, Py_ssize_t have) except -1
    cdef int emit(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef int violation(self, int code, str reason) except -1
    cdef int meter(self, const uint8_t* data, Py_ssize_t size) except -1
    cdef int meter_done(self) except -1
    cdef bint marked(self)


cdef class Relay:
    cdef readonly Leg client
    cdef readonly Leg upstream
    cdef Pipe c2u
    cdef Pipe u2c
    cdef object loop
    cdef object on_done
    cdef public object on_message
    cdef object deadline
    cdef double close_timeout
    cdef bint done
    cdef readonly object closed_by
    cdef readonly object close_code
    cdef readonly object close_reason
    cdef int fail_code             # a peer's violation, told to it once the other peer closed
    cdef str fail_reason
    cdef public object session

    cdef int on_close_frame(self, Pipe pipe, int code, object reason) except -1
    cdef int on_violation(self, Pipe pipe, int code, str reason) except -1
    cdef int send_close(self, Leg leg, int code, str reason, bint finish) except -1
    cdef int check_leg(self, Leg leg) except -1
    cdef int on_lost(self, Leg leg) except -1
    cdef int arm_deadline(self) except -1
