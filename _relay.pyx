# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The relay core: forwards WebSocket frames verbatim between two sockets.

Frame headers are read; payloads only where a hook asks (metering's markers, a
governed session's client messages read whole: docs/relay.md). Payload bytes go
from the read buffer to the other socket untouched (client frames stay masked,
provider frames stay unmasked), as they arrive (cut-through) but for a message read
whole, which is withheld until it is judged. A header is held until it is complete and valid; a close
frame is held whole (at most 139 bytes) so its code and reason can be checked.

One read buffer serves every session of the process: a read's bytes are either
sent to the kernel at once or copied by the transport (only what the kernel did
not take), so nothing refers to the buffer once `buffer_updated` returns.

Per frame the code touches C fields only; Python objects appear per read (at most
one bytes object for an unsent tail), per metered message, and at session
boundaries (close frames, violations, connection loss).

A `Pipe` scans one direction and writes to an `Endpoint`: a `Leg` (a socket) in
the relay, a `Recorder` in `Scanner` (tests, benchmarks, fuzzing). The endpoint
is also told of frame ends it asked for, close frames, violations and metered
messages, so the pipe's per-frame path has no test-only branches.

Closing handshake of one leg (`LegState`; `Endpoint.set_state` refuses any other
transition). "Our close" is the sidecar's own close frame or the other peer's,
forwarded; a frame in flight to the peer delays ours to its end (`CLOSE_QUEUED*`).

    OPEN ──peer's close──> CLOSE_RECEIVED ──our close out──> CLOSED ──next turn──> SHUT
     │  \                           \                          ^
     │   \                           └─our close queued──> CLOSE_QUEUED_LAST ──out──> SHUT
     │    └─peer violates──> FAILED ─our close queued/out (finish: shut after it)
     │                             (the other peer's close, its loss, or the deadline)
     ├─our close queued──> CLOSE_QUEUED ──out──> CLOSE_SENT ──peer's close──> CLOSED
     │                          └─peer's close or finish──> CLOSE_QUEUED_LAST
     └─our close out───────────────────────────> CLOSE_SENT ──finish──> SHUT
    any ──abort, write error──> SHUT          any ──connection_lost──> LOST

"finish": the socket is shut once our close is out, without awaiting the peer's
(it violated the protocol, or the other peer is gone). A violator's bytes are
never read again: its pipe has a verdict. Frames are forwarded only from a leg
whose peer has not closed, to a leg no close was sent to.

TLS legs (the provider's wss, the loopback wss listener) are encrypted here, by
OpenSSL called directly, when the build found its headers (`NATIVE_TLS`): the
handshake and the upgrade run in Python over an `ssl.SSLObject` with memory BIOs
(`conduit_sidecar.tlsleg`), then the leg takes that object's SSL and reads whole
records per socket read, with no Python call per record. Where the kernel encrypts
a leg's sends (kernel TLS, `conduit_sidecar.ktls`), its writes are a plain leg's and
OpenSSL only decrypts. Without NATIVE_TLS, TLS legs are uvloop's SSL transports,
written through `transport.write`.
"""

import os
import ssl
import sys

from cpython.object cimport PyObject

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_WRITE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy, memmove, memset

cdef extern from "<string.h>" nogil:
    void* memmem(const void* haystack, size_t hn, const void* needle, size_t nn)
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from "_tls.h":
    enum: CONDUIT_HAVE_OPENSSL
    enum: SSL_ERROR_WANT_READ
    enum: SSL_ERROR_WANT_WRITE
    enum: SSL_ERROR_ZERO_RETURN
    ctypedef struct BIO:
        pass
    ctypedef struct SSL_SESSION:
        pass
    ctypedef struct conduit_tls_io:
        BIO* bio
        const uint8_t* in_data
        size_t in_len
        uint8_t* out_data
        size_t out_len
        size_t out_cap
    conduit_tls_io conduit_io
    BIO* conduit_bio_new()
    ctypedef struct conduit_ssl_socket:
        SSL* ssl
    ctypedef struct conduit_memory_bio:
        BIO* bio
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct conduit_ssl_context:
        SSL_CTX* ctx
    SSL_CTX* SSL_get_SSL_CTX(const SSL* s)
    int conduit_keep_secrets(SSL_CTX* ctx)
    size_t conduit_take_secret(SSL* s, unsigned char* out)
    ssize_t conduit_kernel_close_notify(int fd)
    int SSL_read_ex(SSL* s, void* buf, size_t num, size_t* readbytes)
    int SSL_write_ex(SSL* s, const void* buf, size_t num, size_t* written)
    int SSL_get_error(const SSL* s, int ret)
    int SSL_shutdown(SSL* s)
    int SSL_free_buffers(SSL* s)
    SSL_SESSION* SSL_get0_session(const SSL* s)
    SSL_SESSION* SSL_SESSION_dup(const SSL_SESSION* session)
    int SSL_set_session(SSL* s, SSL_SESSION* session)
    int SSL_SESSION_is_resumable(const SSL_SESSION* session)
    void SSL_SESSION_free(SSL_SESSION* session)
    BIO* SSL_get_rbio(const SSL* s)
    BIO* SSL_get_wbio(const SSL* s)
    void SSL_set_bio(SSL* s, BIO* rbio, BIO* wbio)
    int BIO_read(BIO* b, void* data, int dlen)
    size_t BIO_ctrl_pending(BIO* b)
    void ERR_clear_error()
    unsigned long OpenSSL_version_num()
    int SSL_get_key_update_type(const SSL* s)
    enum: SSL_KEY_UPDATE_NONE
    int SSL_version(const SSL* s)
    enum: TLS1_3_VERSION

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    enum: MSG_NOSIGNAL
    enum: MSG_DONTWAIT

cdef extern from *:
    """
    #ifdef __linux__
    #include <netinet/in.h>
    #include <netinet/tcp.h>
    #include <sys/ioctl.h>
    /* The peer's reset (1) or end (2) of a TCP socket with nothing left unread; its
       reset with bytes unread (3: Linux keeps them readable before the error). What
       is unread, a close frame among it, is still owed to the other peer: an end
       behind it is 0, as while the socket is open (or it cannot be told). */
    static int conduit_peer_left(int fd) {
        struct tcp_info info;
        socklen_t size = sizeof(info);
        int unread;
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &size) != 0 || size < 1)
            return 0;
        if (info.tcpi_state == TCP_CLOSE)
            return ioctl(fd, FIONREAD, &unread) == 0 && unread > 0 ? 3 : 1;
        if (info.tcpi_state != TCP_CLOSE_WAIT || ioctl(fd, FIONREAD, &unread) != 0)
            return 0;
        return unread == 0 ? 2 : 0;
    }
    /* Bytes wait unread in the socket (1 also when it cannot be told). */
    static int conduit_unread(int fd) {
        int unread;
        return ioctl(fd, FIONREAD, &unread) != 0 || unread > 0;
    }
    #else
    #define conduit_peer_left(fd) 0
    #define conduit_unread(fd) 1
    #endif
    """
    int conduit_peer_left(int fd) nogil
    int conduit_unread(int fd) nogil

# Seconds the other peer may still send after a violation, before it gets our close.
cdef double VIOLATION_GRACE = 0.1

cdef enum:
    READ_SIZE = 262144
    # TLS: the largest record's plaintext. Every SSL_read gets at least this much room
    # (less would split records and leave bytes in OpenSSL between socket reads).
    TLS_RECORD = 16384
    # A read's plaintext (its records and the one it completes) fits in one feed, and
    # the records of one write (a read's worth) in one send.
    PLAIN_SIZE = READ_SIZE + 2 * TLS_RECORD
    CIPHER_SIZE = PLAIN_SIZE + 8192
    COPY_PIECE = 65536
    # A transport's write buffer (and uvloop's TLS transport's read buffer) high-water mark.
    TRANSPORT_HIGH_WATER = 65536
    HIST_BUCKETS = 12
    # Metering states of a pipe.
    METER_IDLE = 0
    METER_SNIFF = 1
    METER_CAPTURE = 2
    METER_SEEK = 3      # window 0: searching the whole message, no marker yet
    CAPTURE_MAX = 4 * 1024 * 1024
    # Control frames a client may put between the fragments of a message read whole.
    PENDING_SLACK = 65536

# Legal transitions: ALLOWED[state] has bit n set if state -> n is allowed.
cdef unsigned[9] ALLOWED = [
    # OPEN
    (1 << CLOSE_RECEIVED) | (1 << FAILED) | (1 << CLOSE_QUEUED) | (1 << CLOSE_QUEUED_LAST)
    | (1 << CLOSE_SENT) | (1 << SHUT) | (1 << LOST),
    # CLOSE_RECEIVED
    (1 << CLOSE_QUEUED_LAST) | (1 << CLOSED) | (1 << SHUT) | (1 << LOST),
    # FAILED
    (1 << CLOSE_QUEUED) | (1 << CLOSE_QUEUED_LAST) | (1 << CLOSE_SENT) | (1 << SHUT) | (1 << LOST),
    # CLOSE_QUEUED
    (1 << CLOSE_QUEUED_LAST) | (1 << CLOSE_SENT) | (1 << SHUT) | (1 << LOST),
    # CLOSE_QUEUED_LAST
    (1 << SHUT) | (1 << LOST),
    # CLOSE_SENT
    (1 << CLOSED) | (1 << SHUT) | (1 << LOST),
    # CLOSED
    (1 << SHUT) | (1 << LOST),
    # SHUT
    (1 << LOST),
    # LOST
    0]
# Source states whose frames are no longer forwarded: its peer closed (or violated),
# or the socket is going.
cdef unsigned PEER_DONE = ((1 << CLOSE_RECEIVED) | (1 << FAILED) | (1 << CLOSE_QUEUED_LAST)
                           | (1 << CLOSED) | (1 << SHUT) | (1 << LOST))

# Shared by all sessions; see the module docstring. A static array, not a bytearray
# (which zero-fills it): its pages become resident only as reads reach them, so an
# idle pod that never read a large burst does not hold 256 KiB for it.
cdef uint8_t _read_ptr[READ_SIZE]
cdef memoryview _read_buffer = PyMemoryView_FromMemory(<char*>_read_ptr, READ_SIZE, PyBUF_WRITE)
# TLS legs: one read's plaintext, and records on their way to a socket (the window
# BIO's, see _tls.h). Like the read buffer, nothing refers to them once a call
# returns (bytes not sent are copied).
cdef uint8_t _plain[PLAIN_SIZE]
cdef uint8_t _cipher[CIPHER_SIZE]
conduit_io.out_data = _cipher
conduit_io.out_cap = CIPHER_SIZE
_SSLSocket = type(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(
    ssl.MemoryBIO(), ssl.MemoryBIO())._sslobj)


cdef SSL* ssl_of(object sslobj) except? NULL:
    """The SSL* inside an ssl.SSLObject (see _tls.h for the layout relied on)."""
    obj = sslobj._sslobj
    if type(obj) is not _SSLSocket:
        raise TypeError("not an ssl.SSLObject")
    return (<conduit_ssl_socket*><PyObject*>obj).ssl


def _native_tls():
    """Whether TLS legs can be relayed by OpenSSL from here: built with its headers,
    linked to the libssl that Python's `ssl` uses, and the _ssl object layout is the
    one _tls.h describes (checked on a throwaway object before any session trusts it)."""
    if not CONDUIT_HAVE_OPENSSL or OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        return False
    if sys.implementation.name != "cpython":
        return False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(incoming, outgoing,
                                                          server_hostname="localhost")
    cdef SSL* s = ssl_of(obj)
    return (s != NULL
            and SSL_get_rbio(s) == (<conduit_memory_bio*><PyObject*>incoming).bio
            and SSL_get_wbio(s) == (<conduit_memory_bio*><PyObject*>outgoing).bio
            and SSL_get_SSL_CTX(s) == (<conduit_ssl_context*><PyObject*>obj.context).ctx)


NATIVE_TLS = os.environ.get("CONDUIT_NATIVE_TLS", "1") != "0" and _native_tls()


def tls_buffers_releasable(unsigned long version):
    """Whether an idle leg may hand its record buffers back (SSL_free_buffers) under
    OpenSSL `version`: before 3.0.14, 3.1.6, 3.2.2 and 3.3.1 that call could free a
    buffer that held a record's first part (CVE-2024-4741); 1.1.1's fix is not public."""
    for fixed in (0x30300010, 0x30200020, 0x30100060, 0x300000e0):
        if version >= fixed & 0xfff00000:  # this minor series or a later one
            return version >= fixed
    return False


# Without it an idle TLS leg keeps OpenSSL's 16 KiB read buffer (docs/relay.md). The
# C copy is what the read path tests: no module-dict lookup per read.
TLS_BUFFERS_RELEASED = NATIVE_TLS and tls_buffers_releasable(OpenSSL_version_num())
cdef bint _release_tls_buffers = TLS_BUFFERS_RELEASED

def tls_free_buffers(object sslobj):
    """Hand back the record buffers of `sslobj` (an ssl.SSLObject) after a read that
    found no record: OpenSSL keeps its read buffer after a post-handshake message (a
    client's session tickets), where SSL_MODE_RELEASE_BUFFERS frees it only after
    application data. False when the buffers stay (one holds a record's first part,
    or this OpenSSL's SSL_free_buffers is not safe: TLS_BUFFERS_RELEASED)."""
    if not _release_tls_buffers:
        return False
    return SSL_free_buffers(ssl_of(sslobj)) == 1


def tls_keep_secrets(object context):
    """From now on, each TLS handshake of `context` (an ssl.SSLContext, NATIVE_TLS)
    keeps its side's first application traffic secret for `tls_take_secret`; False
    when the context already logs its keys (SSLKEYLOGFILE), whose callback stays."""
    if not isinstance(context, ssl.SSLContext):
        raise TypeError("not an ssl.SSLContext")
    cdef int kept = conduit_keep_secrets((<conduit_ssl_context*><PyObject*>context).ctx)
    if kept < 0:
        raise MemoryError()
    return kept == 1


def tls_take_secret(object sslobj):
    """The application traffic secret the handshake of `sslobj` kept (see
    `tls_keep_secrets`), erased from the SSL by this call; None if there is none."""
    cdef unsigned char out[64]
    cdef size_t n = conduit_take_secret(ssl_of(sslobj), out)
    if n == 0:
        return None
    secret = PyBytes_FromStringAndSize(<char*>out, n)
    memset(out, 0, sizeof(out))
    return secret


def tls_key_update_owed(object sslobj):
    """Whether the peer of `sslobj` asked for a key update that OpenSSL has not sent
    yet (it goes with the next write, under the next keys)."""
    return SSL_get_key_update_type(ssl_of(sslobj)) != SSL_KEY_UPDATE_NONE


cdef class TLSSession:
    """A provider leg's resumable TLS session, the relay's own copy. Python's
    `SSLObject.session` getter and its setter copy a session through its DER form,
    which parses the certificate chain again (1.6 M instructions per new session
    with OpenSSL 3.0, more than resumption saves); `SSL_SESSION_dup` copies fields
    and takes references. A copy, not the SSL's own session: OpenSSL marks the
    session of an SSL freed without close_notify not resumable, for every holder."""

    cdef SSL_SESSION* session

    def __dealloc__(self):
        if self.session != NULL:
            SSL_SESSION_free(self.session)


def tls_session(object sslobj):
    """A copy of the session of `sslobj` (an ssl.SSLObject, NATIVE_TLS) with the
    tickets it has read so far, or None when it cannot be resumed."""
    cdef SSL_SESSION* current = SSL_get0_session(ssl_of(sslobj))
    if current == NULL or not SSL_SESSION_is_resumable(current):
        return None
    cdef SSL_SESSION* copy = SSL_SESSION_dup(current)
    if copy == NULL:
        ERR_clear_error()
        return None
    cdef TLSSession held = TLSSession.__new__(TLSSession)
    held.session = copy
    return held


def tls_resume(object sslobj, TLSSession session not None):
    """Offer a copy of `session` in the handshake `sslobj` has not started yet; False
    when OpenSSL refuses it (the handshake is then a full one)."""
    cdef SSL* s = ssl_of(sslobj)
    cdef SSL_SESSION* copy = SSL_SESSION_dup(session.session)
    if copy == NULL:
        ERR_clear_error()
        return False
    cdef int ok = SSL_set_session(s, copy)  # takes its own reference
    SSL_SESSION_free(copy)
    if ok != 1:
        ERR_clear_error()
        return False
    return True


# Process totals, read by the metrics collector at scrape time.
# Rows C2U and U2C, and a third that no total reads: a Scanner's (DISCARDED), so that
# counting a frame takes no branch.
cdef uint64_t g_frames[3][KINDS]
cdef uint64_t g_payload[3][KINDS]
cdef uint64_t g_wire[3]
cdef enum:
    DISCARDED = 2
cdef uint64_t g_hist[HIST_BUCKETS + 1]
cdef uint64_t g_hist_sum_ns = 0
cdef uint64_t[HIST_BUCKETS] HIST_BOUNDS_NS = [
    1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
    1000000, 5000000, 25000000]

KIND_NAMES = ("continuation", "text", "binary", "close", "ping", "pong")
DIRECTION_NAMES = ("client_to_upstream", "upstream_to_client")
HISTOGRAM_BOUNDS = tuple(HIST_BOUNDS_NS[i] / 1e9 for i in range(HIST_BUCKETS))  # seconds
SNIFF_BYTES = SNIFF_DEFAULT
SNIFF_BYTES_MAX = SNIFF_LIMIT

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


cdef inline Py_ssize_t read_header(const uint8_t* h, Py_ssize_t have, Header* f) noexcept:
    """Decode the frame header at `h`, of which `have` bytes are here (the one place
    lengths are decoded). Returns the bytes needed before the frame can be judged:
    its header, or for a close frame of at most 125 bytes the whole frame. `f` is
    complete once `have` reaches the header's size."""
    cdef Py_ssize_t i
    if have < 2:
        return 2
    f.fin = (h[0] & 0x80) != 0
    f.opcode = h[0] & 0x0F
    f.masked = (h[1] & 0x80) != 0
    f.length = h[1] & 0x7F
    f.top_bit = False
    f.size = 2 + (4 if f.masked else 0) + (2 if f.length == 126 else 8 if f.length == 127 else 0)
    if have < f.size:
        return f.size
    if f.length == 126:
        f.length = (<uint64_t>h[2] << 8) | h[3]
    elif f.length == 127:
        f.top_bit = (h[2] & 0x80) != 0
        f.length = 0
        for i in range(2, 10):
            f.length = (f.length << 8) | h[i]
    if f.opcode == 8 and f.length <= 125:
        return f.size + <Py_ssize_t>f.length
    return f.size


cdef uint8_t g_mask_pool[4096]
cdef Py_ssize_t g_mask_at = sizeof(g_mask_pool)


cdef void mask_key(uint8_t* key) except *:
    """4 bytes of `os.urandom`, drawn from a 4 KiB pool: a system call per 1,024
    masked frames, not per frame (npm's ws draws its masks the same way)."""
    global g_mask_at
    if g_mask_at == sizeof(g_mask_pool):
        memcpy(g_mask_pool, PyBytes_AS_STRING(os.urandom(sizeof(g_mask_pool))), sizeof(g_mask_pool))
        g_mask_at = 0
    memcpy(key, g_mask_pool + g_mask_at, 4)
    g_mask_at += 4


cdef object g_redact = None     # set by redact_close_reasons


def redact_close_reasons(redact):
    """Pass each peer's close reason through `redact(str) -> str` before it goes to
    the other peer or into `close_reason` (conduit_sidecar.redact: no secret quoted);
    when it returns another string, the other peer gets a close frame of the sidecar's
    making with it instead of the peer's. Called once at start-up; None: none."""
    global g_redact
    g_redact = redact


cdef object g_linger = None     # set by linger_closes


def linger_closes(linger):
    """Hand each socket shut before its peer's close came (a violator, or a peer whose
    other peer is gone), our close written, to `linger(transport)`, which closes it,
    lingering (True: the transport has another protocol now) or at once (False).
    Called once at start-up; None: such sockets close at once."""
    global g_linger
    g_linger = linger


def close_frame(int code, str reason, bint masked):
    """A close frame carrying `code` and `reason` (cut to fit 125 bytes, never inside
    a UTF-8 sequence). Built in C: the Python version (a generator masking byte by
    byte, a decode per cut) was 1.7% of a new session's instructions."""
    cdef bytes text = reason.encode()
    cdef const uint8_t* r = <const uint8_t*>PyBytes_AS_STRING(text)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(text), i
    cdef Py_ssize_t head = 6 if masked else 2
    if n > 123:
        n = 123
        while n > 0 and (r[n] & 0xC0) == 0x80:   # r[n], the first byte cut, continues a sequence
            n -= 1
    frame = PyBytes_FromStringAndSize(NULL, head + 2 + n)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(frame)
    out[0] = 0x88
    out[1] = (0x80 if masked else 0) | <uint8_t>(2 + n)
    out[head] = <uint8_t>(code >> 8)
    out[head + 1] = <uint8_t>code
    memcpy(out + head + 2, r, n)
    if masked:
        mask_key(out + 2)
        for i in range(2 + n):
            out[head + i] ^= out[2 + (i & 3)]
    return frame


cdef int append(bytearray into, const uint8_t* data, Py_ssize_t size) except -1:
    cdef Py_ssize_t at = PyByteArray_GET_SIZE(into)
    PyByteArray_Resize(into, at + size)
    memcpy(PyByteArray_AS_STRING(into) + at, data, size)
    return 0


cdef bytes text_frame(bytes payload):
    """One unmasked text frame (the sidecar's notice to a client)."""
    cdef object n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def read_buffer(Py_ssize_t sizehint):
    """The shared read buffer (a buffered protocol's `get_buffer`): for protocols whose
    reads are done with when their `buffer_updated` returns."""
    return _read_buffer


cdef class Endpoint:

    cdef int set_state(self, LegState new) except -1:
        """The one place a state changes; an illegal transition is a bug: raise."""
        if new != self.state:
            if not (ALLOWED[<int>self.state] >> <int>new) & 1:
                raise RuntimeError("illegal leg transition %s -> %s"
                                   % (LegState(self.state).name, LegState(new).name))
            self.state = new
            self.at_frame_end = new == CLOSE_QUEUED or new == CLOSE_QUEUED_LAST
        return 0

    cdef int write(self, const uint8_t* data, Py_ssize_t size) except -1:
        return 0

    cdef int frame_end(self, Pipe pipe, Py_ssize_t pos) except -1:
        return 0

    cdef int close_frame(self, Pipe pipe, int code, object reason, Py_ssize_t size) except -1:
        return 0

    cdef int violation(self, Pipe pipe, int code, str reason) except -1:
        return 0

    cdef int metered(self, Pipe pipe, bytes message) except -1:
        return 0


cdef class Leg(Endpoint):

    def __cinit__(self):
        self.fd = -1

    cdef bytes attach(self, Relay relay, object transport, Pipe inbound, Pipe outbound,
                      object tls, bint kernel_tx):
        """Take the transport (and `tls`, an ssl.SSLObject past its handshake over a plain
        transport; `kernel_tx`: the kernel encrypts what is sent on the socket). Returns
        the records the handshake read but left undecrypted."""
        cdef bytes unread = b""
        self.relay = relay
        self.transport = transport
        self.inbound = inbound
        self.outbound = outbound
        if tls is not None:
            unread = self.take_tls(tls)
            self.kernel_tx = kernel_tx
        # uvloop's TLS transports encrypt what they are given: no file descriptor to write to.
        if transport.get_extra_info("sslcontext") is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self.fd = sock.fileno()
        else:
            # Paused, it would read on until 256 KiB of records wait; above one record,
            # as the limit is checked after a read and half a record must still be read.
            transport.set_read_buffer_limits(high=TRANSPORT_HIGH_WATER)
        transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
        transport.set_protocol(self)
        # What the transport still holds (the 101; uvloop < 0.20 queues every write until
        # the loop turns) must go first: write through it until it is empty.
        self.backlog = True
        return unread

    cdef bytes take_tls(self, object tls):
        """The SSL of `tls` moves from its memory BIOs to the window BIO (_tls.h);
        returns the records left in the read BIO."""
        cdef SSL* s = ssl_of(tls)
        cdef BIO* old
        cdef BIO* bio
        cdef bytes unread
        cdef Py_ssize_t n
        old = SSL_get_wbio(s)
        n = BIO_ctrl_pending(old)
        if n:       # (the handshake's stream sends its records at once: none expected)
            sent = PyBytes_FromStringAndSize(NULL, n)
            BIO_read(old, PyBytes_AS_STRING(sent), n)
            self.transport.write(sent)
        old = SSL_get_rbio(s)
        n = BIO_ctrl_pending(old)
        unread = PyBytes_FromStringAndSize(NULL, n)
        if n:
            BIO_read(old, PyBytes_AS_STRING(unread), n)
        bio = conduit_bio_new()
        if bio == NULL:
            raise MemoryError()
        SSL_set_bio(s, bio, bio)    # releases the SSL's references to the memory BIOs
        if _release_tls_buffers:
            SSL_free_buffers(s)     # set up by the handshake's last read, which found none
        self.ssl = s
        self.tls = tls              # the SSLObject owns the SSL (and now the window BIO)
        return unread

    cdef int write(self, const uint8_t* data, Py_ssize_t size) except -1:
        cdef size_t done
        cdef int ok
        if self.ssl == NULL or self.kernel_tx:
            return self.send_raw(data, size)
        if self.state >= SHUT or size <= 0:
            return 0
        while True:
            conduit_io.bio = SSL_get_wbio(self.ssl)
            ok = SSL_write_ex(self.ssl, data, size, &done)
            conduit_io.bio = NULL
            if ok or SSL_get_error(self.ssl, ok) != SSL_ERROR_WANT_WRITE:
                break
            # The records so far fill the buffer: they go out, the same call goes on.
            self.flush_tls()
            if self.state >= SHUT:
                return 0
        if not ok:
            ERR_clear_error()
            conduit_io.out_len = 0
            return self.drop()
        return self.flush_tls()

    cdef int flush_tls(self) except -1:
        """Records this leg's last SSL call wrote go to its socket."""
        cdef size_t n = conduit_io.out_len
        if n:
            conduit_io.out_len = 0
            self.send_raw(conduit_io.out_data, n)
        return 0

    cdef int read_tls(self, const uint8_t* data, Py_ssize_t size) except -1:
        """Bytes read from a TLS leg's socket: OpenSSL decrypts every whole record
        straight from `data` (a partial one it keeps for the next read), and the
        read's plaintext goes to the pipe in one feed, as a plain leg's read does."""
        cdef size_t got
        cdef Py_ssize_t have = 0
        cdef int ok = 1
        cdef int err = SSL_ERROR_WANT_READ
        cdef BIO* bio = SSL_get_rbio(self.ssl)
        while True:
            conduit_io.bio, conduit_io.in_data, conduit_io.in_len = bio, data, size
            while PLAIN_SIZE - have >= TLS_RECORD:
                ok = SSL_read_ex(self.ssl, _plain + have, PLAIN_SIZE - have, &got)
                if not ok:
                    break
                have += got
            data, size = conduit_io.in_data, conduit_io.in_len
            # The window is this read's alone: a later call on this leg's BIO (which
            # reads and writes) must not find its bytes.
            conduit_io.bio, conduit_io.in_len = NULL, 0
            if not ok:
                err = SSL_get_error(self.ssl, ok)
                ERR_clear_error()
            if self.kernel_tx:
                # OpenSSL's records (an alert) would go out as application data under
                # the kernel's keys: the peer gets the drop below instead.
                conduit_io.out_len = 0
            else:
                self.flush_tls()    # answers to post-handshake messages (key updates)
            if have:
                self.inbound.feed(_plain, have)
                have = 0
            if self.kernel_tx and SSL_get_key_update_type(self.ssl) != SSL_KEY_UPDATE_NONE:
                # The peer asked for a key update. OpenSSL owes it one, sent at its next
                # write, which the kernel's sends have replaced (and left its sequence).
                return self.drop()
            if not ok:
                break
            if self.relay is None or self.relay.done or self.inbound.verdict_code:
                return 0
        if self.state >= SHUT:
            return 0
        if err == SSL_ERROR_ZERO_RETURN:
            # The peer's close_notify: like a plain leg's EOF. TLS 1.3 ends each side on
            # its own (RFC 8446 6.1): after its close frame the peer still reads, and the
            # answer goes to it, then our close_notify (what it sends after is not read).
            # TLS 1.2 wants our close_notify at once, pending writes dropped (RFC 5246 7.2.1).
            if SSL_version(self.ssl) < TLS1_3_VERSION or not self.ended_after_close():
                self.shut()
        elif err != SSL_ERROR_WANT_READ:
            self.drop()         # a bad record or alert: connection_lost follows
        elif _release_tls_buffers:
            # The read that found no record set up OpenSSL's read buffer, which
            # SSL_MODE_RELEASE_BUFFERS frees only after a whole record: an idle leg would
            # keep it. A record's first part keeps it (the call then does nothing).
            SSL_free_buffers(self.ssl)
        return 0

    cdef bint ended_after_close(self):
        """Whether the peer's end of its side (TCP FIN, close_notify) leaves the socket
        half-open: after its close frame it still reads, and the answer to its close
        (within the close timeout) goes to it."""
        return self.state == CLOSE_RECEIVED or self.state == CLOSE_QUEUED_LAST or self.state == CLOSED

    cdef int send_raw(self, const uint8_t* data, Py_ssize_t size) except -1:
        """Bytes for the socket as they are (a plain leg's frames, a TLS leg's records)."""
        cdef ssize_t sent
        cdef Py_ssize_t piece
        if self.state >= SHUT or size <= 0 or self.peer_left:
            return 0
        if self.fd >= 0:
            if self.backlog and self.transport.get_write_buffer_size() == 0:
                self.backlog = False
            if not self.backlog:
                sent = send(self.fd, data, size, MSG_NOSIGNAL | MSG_DONTWAIT)
                if sent == size:
                    return 0
                if sent < 0:
                    if errno != EAGAIN and errno != EINTR:   # EWOULDBLOCK is EAGAIN on Linux
                        # The peer is gone; connection_lost will follow. What it sent
                        # before a reset, still unread, is owed to the other peer first.
                        if conduit_peer_left(self.fd) == 3:
                            return self.left_behind()
                        return self.drop()
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

    cdef int frame_end(self, Pipe pipe, Py_ssize_t pos) except -1:
        """A frame boundary to this peer: our queued frames go out."""
        cdef bytes frame = self.queued_notice
        if frame is not None:
            self.queued_notice = None
            if not pipe.fragmented:     # a data frame cannot go between fragments
                self.write(<uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
        frame = self.queued_close
        self.queued_close = None
        self.write(<uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
        if self.state == CLOSE_QUEUED:
            self.set_state(CLOSE_SENT)
        elif self.state == CLOSE_QUEUED_LAST:
            self.shut()
        return 0

    cdef int close_frame(self, Pipe pipe, int code, object reason, Py_ssize_t size) except -1:
        return self.relay.on_close_frame(pipe, code, reason, size)

    cdef int violation(self, Pipe pipe, int code, str reason) except -1:
        return self.relay.on_violation(pipe, code, reason)

    cdef int metered(self, Pipe pipe, bytes message) except -1:
        cdef Relay relay = self.relay
        judge = relay.on_client_message if pipe.direction == C2U else relay.on_message
        if judge is not None:
            judge(relay, message)
        return 0

    cdef int shut(self) except -1:
        """Close the socket once what was written is out."""
        cdef Relay relay = self.relay
        if self.state < SHUT:
            if self.kernel_tx:
                # The kernel's close_notify; not past bytes the transport still holds.
                if self.backlog and self.transport.get_write_buffer_size() == 0:
                    self.backlog = False
                if not self.backlog:
                    conduit_kernel_close_notify(self.fd)
            elif self.ssl != NULL:
                # close_notify, then the TCP close once it is out.
                conduit_io.bio = SSL_get_wbio(self.ssl)
                SSL_shutdown(self.ssl)
                conduit_io.bio = NULL
                ERR_clear_error()
                self.flush_tls()
            self.set_state(SHUT)
            self.bound_close()
            if relay is None or g_linger is None or self.inbound.ended or not self.may_send():
                self.transport.close()
            elif g_linger(self.transport):
                # The peer's close has not come (it violated the protocol, and is read no
                # more; or the other peer is gone): it may still send. Closed now with its
                # bytes unread, its socket would answer them with a reset, which can
                # destroy our close before the peer reads it. Its lingering close reads
                # and drops them; to the relay the leg is gone.
                self.transport = None
                relay.loop.call_soon(self.connection_lost, None)
        return 0

    cdef bint may_send(self):
        """Whether the peer, its close not come, looks to be still sending (nginx's
        lingering_close heuristics): bytes unread in the socket (a violator's, read no
        more since), or a frame or message half read. A peer quiet between messages, as
        most whose other peer left are, is closed at once: a lingering close costs a
        protocol, a timer and a loop turn (about 24 k instructions, 2.6% of a session)."""
        cdef Pipe pipe = self.inbound
        if self.fd < 0 or pipe.left or pipe.nheld or pipe.fragmented:
            return True
        return conduit_unread(self.fd)

    cdef int bound_close(self) except -1:
        """The transport is to close: it waits until what it holds is sent, which a peer
        that reads no more never takes (its socket, and the session, would stay for
        ever, as after the peer's end of file or close_notify). It is dropped at the
        close timeout."""
        if self.relay is not None and self.transport.get_write_buffer_size():
            self.relay.loop.call_later(self.relay.close_timeout, self.transport.abort)
        return 0

    cdef int drop(self) except -1:
        """Drop the socket now (unsent bytes are lost)."""
        if self.state != LOST and self.transport is not None:
            if self.state < SHUT:
                self.set_state(SHUT)
            self.transport.abort()
        return 0

    cdef int left_behind(self) except -1:
        """The peer reset behind bytes not read yet (its last messages, its close): they
        stay readable in the socket (not in our memory), owed to the other peer, and
        what is sent to the peer is dropped (not counted as relayed, nor charged as
        audio: Pipe.dst_left). The leg is dropped at the close timeout if they have not
        been taken by then (a peer that floods and resets while the other takes nothing
        would keep the session for ever)."""
        if not self.peer_left:
            self.peer_left = True
            self.outbound.dst_left = True
            self.relay.loop.call_later(self.relay.close_timeout, self.transport.abort)
        return 0

    # asyncio (buffered) protocol. uvloop keeps the protocol's `data_received`,
    # `get_buffer` and `buffer_updated` as it finds them on set_protocol: class
    # attributes and the leg itself, not a bound method per transport (a leg has no
    # use for data_received; the read buffer is shared; `buffer_updated` is the leg,
    # whose call is the handler: 64 bytes less per leg of every idle session).

    data_received = None
    get_buffer = staticmethod(read_buffer)

    @property
    def buffer_updated(self):
        return self

    def __call__(self, Py_ssize_t nbytes):
        # Nothing is read from a violator (its pipe has a verdict) or after the session.
        if self.relay is None or self.relay.done or self.inbound.verdict_code:
            return
        cdef uint64_t t0 = now_ns()
        if self.ssl != NULL:
            self.read_tls(_read_ptr, nbytes)
        else:
            self.inbound.feed(_read_ptr, nbytes)
        observe(now_ns() - t0)

    def eof_received(self):
        # Without a close frame first, a half-closed peer ends the session: the transport
        # closes. (uvloop's TLS transports, which have no fd here, cannot stay
        # half-open: they would log a warning.)
        if self.fd >= 0 and self.ended_after_close():
            return True
        self.bound_close()
        return False

    def pause_writing(self):
        if self.outbound is None:
            return      # the session is over
        cdef Leg src = <Leg>self.outbound.src
        if src.state < SHUT:
            src.transport.pause_reading()

    def resume_writing(self):
        if self.outbound is None:
            return
        cdef Leg src = <Leg>self.outbound.src
        if src.state < SHUT and not self.outbound.verdict_code:
            src.transport.resume_reading()

    def connection_lost(self, exc):
        # A local reference: on_lost may drop the relay's last one (it breaks cycles).
        cdef Relay relay = self.relay
        self.set_state(LOST)
        relay.on_lost(self)
        # Nothing uses a lost leg's transport. uvloop's SSL transport keeps its protocol
        # (this leg) after the end: leg -> transport -> SSLProtocol -> leg would be a
        # cycle, and each session's TLS buffers would wait for the cyclic GC.
        self.transport = None


cdef class Recorder(Endpoint):

    def __init__(self, bint record):
        if record:
            self.output = bytearray()
            self.boundaries = []
            self.messages = []
            self.at_frame_end = True

    cdef int set_state(self, LegState new) except -1:
        Endpoint.set_state(self, new)
        self.at_frame_end = self.boundaries is not None
        return 0

    cdef int write(self, const uint8_t* data, Py_ssize_t size) except -1:
        if self.output is not None:
            self.output += PyBytes_FromStringAndSize(<char*>data, size)
        return 0

    cdef int frame_end(self, Pipe pipe, Py_ssize_t pos) except -1:
        self.boundaries.append(self.offset + <uint64_t>pos)
        return 0

    cdef int close_frame(self, Pipe pipe, int code, object reason, Py_ssize_t size) except -1:
        # The recorder is the pipe's source too: frames after a close are dropped.
        return self.set_state(CLOSE_RECEIVED)

    cdef int metered(self, Pipe pipe, bytes message) except -1:
        if self.messages is not None:
            self.messages.append(message)
        return 0


cdef class Pipe:

    def __init__(self, int direction, bint masked, uint64_t max_message):
        self.direction = direction
        self.masked = masked
        self.max_message = max_message

    def __dealloc__(self):
        PyMem_Free(self.held)
        PyMem_Free(self.sniff)

    cdef int set_metering(self, tuple markers, bint binary, Py_ssize_t window) except -1:
        """Hand messages that contain any of `markers` in their first `window` bytes to
        dst (text messages, and binary ones if `binary`). Window 0: markers anywhere in
        a message, which is handed over from its first marker on (`seek`)."""
        if not markers:
            return 0
        if not 0 <= window <= SNIFF_LIMIT:
            raise ValueError("sniff window must be 0..%d bytes (0: the whole message)" % SNIFF_LIMIT)
        if window == 0 and self.masked:
            raise ValueError("whole messages are searched for markers only unmasked")
        for m in markers:
            if not isinstance(m, bytes) or not 0 < len(m) <= (window or SNIFF_LIMIT):
                raise ValueError("a marker must be non-empty bytes within the sniff window")
        if window == 0 and any([a in b[1:] for a in markers for b in markers]):
            # Found first, while the one around it may still be arriving.
            raise ValueError("with whole messages searched, no marker may lie inside another")
        self.markers = markers
        self.meter_binary = binary
        self.window = window
        self.reach = 0 if window else max([len(m) for m in markers])
        return 0

    cdef int read_whole_up_to(self, uint64_t limit) except -1:
        """Read each text message whole (see Relay's `on_client_message`); it is held
        twice while it comes (raw and unmasked), so every message is bounded by
        `limit`, and by the capture's own bound."""
        self.read_whole = True
        self.max_message = min(self.max_message, limit, <uint64_t>CAPTURE_MAX)
        return 0

    cdef int emit(self, const uint8_t* data, Py_ssize_t size) except -1:
        if size > 0:
            if self.pending is not None:
                append(self.pending, data, size)
            else:
                self.dst.write(data, size)
        return 0

    cdef int violation(self, int code, str reason) except -1:
        self.verdict_code = code
        self.verdict_reason = reason
        return self.dst.violation(self, code, reason)

    cdef int start_frame(self, const uint8_t* h, Header* f, Py_ssize_t have) except -1:
        """Judge a frame from its first `have` bytes (its header, or a whole close
        frame), decoded in `f`. Returns 1 on a violation (already reported), else 0."""
        cdef int fin = f.fin, opcode = f.opcode
        cdef uint64_t plen = f.length
        cdef Py_ssize_t hlen = f.size, i
        cdef int code = 0
        cdef uint8_t p0, p1
        cdef object reason = None
        cdef bint forward
        if h[0] & 0x70:
            return self.violation(PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)") + 1
        if 2 < opcode < 8 or opcode > 10:
            return self.violation(PROTOCOL_ERROR, "reserved opcode %d" % opcode) + 1
        if f.masked != self.masked:
            return self.violation(PROTOCOL_ERROR, "unmasked frame from the client" if self.masked
                                  else "masked frame from the upstream") + 1
        if f.top_bit:
            return self.violation(PROTOCOL_ERROR, "64-bit payload length with the top bit set") + 1
        if opcode >= 8:
            if not fin:
                return self.violation(PROTOCOL_ERROR, "fragmented control frame") + 1
            if plen > 125:
                return self.violation(PROTOCOL_ERROR, "control frame payload over 125 bytes") + 1
            if opcode == 8 and self.pending is not None:
                self.release(False)         # the unfinished message is dropped with its close
        if (self.pending is not None
                and PyByteArray_GET_SIZE(self.pending) - <Py_ssize_t>self.message_bytes > PENDING_SLACK):
            # What is withheld besides the message's payload: its fragments' headers (an
            # empty continuation frame adds 6 bytes and no payload) and control frames.
            return self.violation(MESSAGE_TOO_BIG, "control frames and fragment headers inside a message"
                                  " over %d bytes" % PENDING_SLACK) + 1
        if opcode < 8:
            if opcode == 0:
                if not self.fragmented:
                    return self.violation(PROTOCOL_ERROR,
                                          "continuation frame without a message to continue") + 1
            else:
                if self.fragmented:
                    return self.violation(PROTOCOL_ERROR,
                                          "new data message inside a fragmented message") + 1
                self.message_bytes = 0
            if plen > self.max_message - self.message_bytes:
                return self.violation(MESSAGE_TOO_BIG, "message over %d bytes" % self.max_message) + 1
            self.message_bytes += plen
            self.fragmented = not fin
            if self.read_whole and opcode != 0:
                self.meter_state = METER_IDLE
                if opcode == 1:
                    self.meter_state = METER_CAPTURE
                    self.capture = bytearray()
                    self.pending = bytearray()
            elif self.markers is not None and opcode != 0:
                self.meter_state = METER_IDLE
                if self.reach and (opcode == 1 or self.meter_binary):
                    self.meter_state = METER_SEEK
                elif opcode == 1 or self.meter_binary:
                    if self.sniff == NULL:
                        self.sniff = <uint8_t*>PyMem_Malloc(self.window)
                        if self.sniff == NULL:
                            raise MemoryError()
                    self.meter_state = METER_SNIFF
                self.nsniff = 0
            if self.masked and self.meter_state:
                memcpy(self.mask, h + hlen - 4, 4)
                self.mask_phase = 0
        self.message_end = fin and opcode < 8
        self.data_frame = opcode < 8
        if opcode == 8:
            if plen == 1:
                return self.violation(PROTOCOL_ERROR, "close frame with a 1-byte payload") + 1
            if plen >= 2:
                p0 = h[hlen]
                p1 = h[hlen + 1]
                if f.masked:
                    p0 ^= h[hlen - 4]
                    p1 ^= h[hlen - 3]
                code = (p0 << 8) | p1
                if not valid_close_code(code):
                    return self.violation(PROTOCOL_ERROR, "invalid close code %d" % code) + 1
                raw = bytearray(h[hlen + 2:hlen + plen])
                if f.masked:
                    for i in range(len(raw)):
                        raw[i] ^= h[hlen - 4 + ((i + 2) & 3)]
                try:
                    reason = raw.decode()
                except UnicodeDecodeError:
                    return self.violation(INVALID_DATA, "invalid UTF-8 in close reason") + 1
            else:
                code = NO_STATUS
                reason = ""
        # Not from a peer that closed (or violated), not to one we closed; a violator
        # gets the sidecar's close, not the other peer's reply.
        forward = not ((PEER_DONE >> <int>self.src.state) & 1 or self.dst.state >= CLOSE_QUEUED
                       or (opcode == 8 and self.dst.state == FAILED))
        self.forwarding = forward
        self.left = plen - <uint64_t>(have - hlen)
        if forward and not self.dst_left:
            i = kind_of(opcode)
            self.frames[i] += 1
            self.payload[i] += plen
            self.wire_bytes += hlen + plen
            g_frames[self.direction][i] += 1
            g_payload[self.direction][i] += plen
            g_wire[self.direction] += hlen + plen
        if opcode == 8:
            # RFC 6455 1.4: after a close a peer discards what it receives. Judged, a
            # bad frame behind the close would fail a closing handshake under way.
            self.ended = True
            self.dst.close_frame(self, code, reason, hlen + plen)
        return 0

    cdef int feed(self, const uint8_t* p, Py_ssize_t n) except -1:
        """Scan and forward `n` bytes read from src."""
        cdef Py_ssize_t pos = 0, run = 0, need, take
        cdef Header f
        cdef Endpoint dst = self.dst
        cdef bytes message
        if self.ended:
            return 0
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
                need = read_header(self.held, self.nheld, &f)
                while self.nheld < need and pos < n:
                    take = min(need - self.nheld, n - pos)
                    memcpy(self.held + self.nheld, p + pos, take)
                    self.nheld += take
                    pos += take
                    need = read_header(self.held, self.nheld, &f)
                run = pos
                if self.nheld < need:
                    break
                if self.start_frame(self.held, &f, need):
                    return 0
                if self.forwarding:
                    self.emit(self.held, need)
                self.nheld = 0
            else:
                need = read_header(p + pos, n - pos, &f)
                if n - pos < need:
                    self.emit(p + run, pos - run)
                    if self.held == NULL:   # most sessions never split a frame start
                        self.held = <uint8_t*>PyMem_Malloc(HELD_MAX)
                        if self.held == NULL:
                            raise MemoryError()
                    memcpy(self.held, p + pos, n - pos)
                    self.nheld = n - pos
                    run = pos = n
                    break
                if f.opcode == 8 or self.pending is not None or (self.read_whole and f.opcode == 1):
                    # Its close handshake may write to dst (our close, to a violator)
                    # and shut it: what came before it in this read goes first. A
                    # message read whole is withheld from its first byte, and what is
                    # withheld is whole at each of its frames (start_frame bounds it).
                    self.emit(p + run, pos - run)
                    run = pos
                if self.start_frame(p + pos, &f, need):
                    self.emit(p + run, pos - run)
                    return 0
                if not self.forwarding:
                    self.emit(p + run, pos - run)
                    run = pos + need
                pos += need
            if self.left == 0 and self.nheld == 0:
                if self.message_end:
                    self.message_end = False
                    if self.meter_state:
                        message = self.metered_message()
                        if message is not None or self.pending is not None:
                            # on_message may close the session (a budget): the message
                            # goes out before the close notice, not after or inside it.
                            # Only then: a write per message costs a send each, and
                            # in a paused transport an object (or a TLS record) each.
                            self.emit(p + run, pos - run)
                            run = pos
                            self.meter_done(message)
                if dst.at_frame_end:
                    # A frame boundary the endpoint waits for (e.g. to send its close).
                    self.emit(p + run, pos - run)
                    run = pos
                    dst.frame_end(self, pos)
                if self.ended:
                    break
        self.emit(p + run, pos - run)
        return 0

    cdef int meter(self, const uint8_t* data, Py_ssize_t size) except -1:
        """Payload bytes of a metered message: sniff its start, capture it if marked."""
        cdef Py_ssize_t take
        cdef Py_ssize_t at
        if self.meter_state == METER_SEEK:
            return self.seek(data, size)
        if self.meter_state == METER_SNIFF:
            take = min(size, self.window - self.nsniff)
            memcpy(self.sniff + self.nsniff, data, take)
            if self.masked:
                self.unmask(self.sniff + self.nsniff, take)
            self.nsniff += take
            if self.nsniff < self.window:
                return 0
            if not self.marked():
                self.meter_state = METER_IDLE
                self.release_sniff()
                return 0
            self.meter_state = METER_CAPTURE
            self.capture = bytearray(self.sniff[:self.nsniff])
            self.release_sniff()
            data += take
            size -= take
        if len(self.capture) + size > CAPTURE_MAX:
            self.meter_state = METER_IDLE      # far larger than any usage event
            self.capture = None
        elif size > 0:
            at = PyByteArray_GET_SIZE(self.capture)
            append(self.capture, data, size)
            if self.masked:
                self.unmask(<uint8_t*>PyByteArray_AS_STRING(self.capture) + at, size)
        return 0

    cdef int seek(self, const uint8_t* data, Py_ssize_t size) except -1:
        """Payload bytes of a message searched whole (window 0): searched where they
        are, not copied. Only the last reach - 1 bytes are kept (`sniff`, allocated
        once a message spans reads), for a marker split across reads; from the first
        marker on, the message is captured."""
        cdef Py_ssize_t keep = self.reach - 1, take = 0, at, n
        if self.nsniff:
            # The kept bytes and the first few of these, searched together.
            take = min(size, keep)
            memcpy(self.sniff + self.nsniff, data, take)
            at = self.first_marker(self.sniff, self.nsniff + take)
            if at >= 0:
                self.capture = bytearray(self.sniff[at:self.nsniff + take])
                self.meter_state = METER_CAPTURE
                self.release_sniff()
                return self.meter(data + take, size - take)
        at = self.first_marker(data, size)
        if at >= 0:
            self.capture = bytearray()
            self.meter_state = METER_CAPTURE
            self.release_sniff()
            return self.meter(data + at, size - at)
        if keep == 0:
            return 0
        if self.sniff == NULL:
            self.sniff = <uint8_t*>PyMem_Malloc(2 * keep)
            if self.sniff == NULL:
                raise MemoryError()
        if size >= keep:
            memcpy(self.sniff, data + size - keep, keep)
            self.nsniff = keep
            return 0
        if not take:
            memcpy(self.sniff + self.nsniff, data, size)
        n = self.nsniff + size
        if n > keep:
            memmove(self.sniff, self.sniff + n - keep, keep)
            n = keep
        self.nsniff = n
        return 0

    cdef Py_ssize_t first_marker(self, const uint8_t* data, Py_ssize_t size) noexcept:
        """Where the first marker in `data` starts; -1: none does."""
        cdef Py_ssize_t first = -1
        cdef const uint8_t* hit
        cdef bytes m
        for m in self.markers:
            hit = <const uint8_t*>memmem(data, size, PyBytes_AS_STRING(m), PyBytes_GET_SIZE(m))
            if hit != NULL and (first < 0 or hit - data < first):
                first = hit - data
        return first

    cdef void unmask(self, uint8_t* data, Py_ssize_t size) noexcept:
        """Undo the current frame's mask on a copy of its next `size` payload bytes."""
        cdef Py_ssize_t i = 0
        cdef uint8_t phase = self.mask_phase
        cdef uint8_t key[8]
        cdef uint64_t word, k8
        for i in range(8):
            key[i] = self.mask[(phase + i) & 3]
        memcpy(&k8, key, 8)
        i = 0
        while i + 8 <= size:            # eight bytes at a time: the key repeats every four
            memcpy(&word, data + i, 8)
            word ^= k8
            memcpy(data + i, &word, 8)
            i += 8
        while i < size:
            data[i] ^= key[i & 7]
            i += 1
        self.mask_phase = <uint8_t>((phase + size) & 3)

    cdef bint marked(self):
        cdef bytes m
        for m in self.markers:
            if memmem(self.sniff, self.nsniff, PyBytes_AS_STRING(m), PyBytes_GET_SIZE(m)) != NULL:
                return True
        return False

    cdef bytes metered_message(self):
        """A metered message ended: what goes to dst (None unless it carries a marker)."""
        cdef bytes message = None
        if self.meter_state == METER_SNIFF and self.marked():
            message = self.sniff[:self.nsniff]
        elif self.meter_state == METER_CAPTURE:
            message = bytes(self.capture)
        self.meter_state = METER_IDLE
        self.capture = None
        self.release_sniff()
        return message

    cdef int meter_done(self, bytes message) except -1:
        """Hand `message` (metered_message's) to dst; release a message read whole."""
        # A message read whole that can no longer go on (a close is out) is not judged.
        if message is not None and (self.pending is None or self.dst.state < CLOSE_QUEUED):
            self.dst.metered(self, message)
        if self.pending is not None:
            self.release(True)
        return 0

    cdef int release(self, bint deliver) except -1:
        """End withholding the message read whole: its bytes go to dst if `deliver`
        and dst is still open to them (its judgement may have closed the session)."""
        cdef bytearray pending = self.pending
        self.pending = None
        self.meter_state = METER_IDLE
        self.capture = None
        if deliver and self.dst.state < CLOSE_QUEUED:
            self.dst.write(<uint8_t*>PyByteArray_AS_STRING(pending), PyByteArray_GET_SIZE(pending))
        return 0

    cdef void release_sniff(self) noexcept:
        # Held only while a message's start is sniffed: an idle session keeps none.
        PyMem_Free(self.sniff)
        self.sniff = NULL

    def counters(self):
        """(frames per kind, payload bytes per kind, wire bytes)."""
        # List comprehensions: a generator per tuple cost Cython 7 k instructions each.
        return (tuple([self.frames[i] for i in range(KINDS)]),
                tuple([self.payload[i] for i in range(KINDS)]), self.wire_bytes)


cdef class Scanner(Pipe):
    """The relay's scanner without sockets, for tests and benchmarks: forwarded
    bytes go to `output`, frame ends to `frame_boundaries`, metered messages to
    `metered` (a Recorder is the pipe's source and sink)."""
    cdef Recorder recorder

    def __init__(self, bint masked, uint64_t max_message=1 << 62, bint record=True,
                 tuple markers=(), bint meter_binary=False, Py_ssize_t sniff_bytes=SNIFF_DEFAULT,
                 uint64_t read_whole_up_to=0):
        self.direction = DISCARDED  # nothing it scans is relayed: out of the process's totals
        self.masked = masked
        self.max_message = max_message
        if read_whole_up_to:
            self.read_whole_up_to(read_whole_up_to)
        self.recorder = Recorder(record)
        self.src = self.dst = self.recorder
        self.set_metering(markers, meter_binary, sniff_bytes)

    def feed_bytes(self, const uint8_t[:] data):
        cdef Py_ssize_t n = data.shape[0]
        if n and self.verdict_code == 0:
            self.feed(&data[0], n)
            self.recorder.offset += <uint64_t>n

    @property
    def output(self):
        return bytes(self.recorder.output)

    @property
    def frame_boundaries(self):
        return list(self.recorder.boundaries)

    @property
    def metered(self):
        return list(self.recorder.messages)


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
    sidecar's own close frames; `on_done(relay)` is called once both sockets are gone.
    Provider messages (text, and binary if `meter_binary`) with any of `markers` in
    their first `sniff_bytes` bytes go to `on_message(relay, bytes)` (`sniff_bytes` 0:
    with a marker anywhere, from their first marker on). With
    `on_client_message`, each client text message is read whole and withheld from the
    provider until `on_client_message(relay, unmasked bytes)` returns: it goes on
    unless that closed the session. Every client message is then at most
    `read_whole_max` bytes (and 4 MiB)."""

    def __init__(self, loop, uint64_t max_message, double close_timeout, on_done,
                 tuple markers=(), on_message=None, *, bint meter_binary=False,
                 Py_ssize_t sniff_bytes=SNIFF_DEFAULT, on_client_message=None,
                 uint64_t read_whole_max=CAPTURE_MAX):
        self.loop = loop
        self.on_done = on_done
        self.close_timeout = close_timeout
        self.client = Leg()
        self.upstream = Leg()
        self.c2u = Pipe(C2U, True, max_message)
        self.u2c = Pipe(U2C, False, max_message)
        self.u2c.set_metering(markers, meter_binary, sniff_bytes)
        self.on_message = on_message
        self.on_client_message = on_client_message
        if on_client_message is not None:
            self.c2u.read_whole_up_to(read_whole_max)
        self.c2u.src = self.u2c.dst = self.client
        self.c2u.dst = self.u2c.src = self.upstream

    def start(self, client_transport, upstream_transport, bytes client_early=b"",
              bytes upstream_early=b"", client_tls=None, upstream_tls=None,
              bint client_kernel_tx=False, bint upstream_kernel_tx=False):
        """Take over both transports; forward bytes already read past each handshake.
        A `*_tls` SSLObject (NATIVE_TLS) makes that leg TLS over its plain transport;
        records it holds unread are relayed now, after the early bytes. With
        `*_kernel_tx` the kernel encrypts that leg's sends (conduit_sidecar.ktls) and
        OpenSSL only decrypts."""
        cdef bytes client_records = self.client.attach(self, client_transport, self.c2u,
                                                       self.u2c, client_tls, client_kernel_tx)
        cdef bytes upstream_records = self.upstream.attach(self, upstream_transport, self.u2c,
                                                           self.c2u, upstream_tls,
                                                           upstream_kernel_tx)
        cdef Leg leg
        for leg in (self.client, self.upstream):
            if leg.transport.get_write_buffer_size():
                # Bytes written before the handover (a greeting the client has not read)
                # may have paused the transport's protocol then: the handshake's, not
                # this leg, which would never hear of it, and the other leg's bytes would
                # go into the buffer unread. Paused from here, the transport tells this
                # leg when it drains (high=0: pause_writing unless paused already).
                leg.transport.set_write_buffer_limits(high=0)
                leg.pause_writing()
                leg.transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
        if upstream_early:
            self.u2c.feed(<uint8_t*>PyBytes_AS_STRING(upstream_early), len(upstream_early))
        if upstream_records and not self.done and not self.u2c.verdict_code:
            self.upstream.read_tls(<uint8_t*>PyBytes_AS_STRING(upstream_records),
                                   len(upstream_records))
        if client_early and not self.done:
            self.c2u.feed(<uint8_t*>PyBytes_AS_STRING(client_early), len(client_early))
        if client_records and not self.done and not self.c2u.verdict_code:
            self.client.read_tls(<uint8_t*>PyBytes_AS_STRING(client_records),
                                 len(client_records))

    def close(self, int client_code, str client_reason, int upstream_code, str upstream_reason,
              bytes client_notice=None):
        """Close both sides with the sidecar's own close frames (shutdown, revoked key).
        `client_notice` (UTF-8) goes to the client as one text frame just before its
        close, at the next frame boundary; it is left out if the client's leg is no
        longer open or the upstream's message to the client is unfinished
        (fragmented: a data frame cannot go between its fragments). After a violation
        it does nothing: the violator broke the protocol first, and the closes under way
        (the other peer's after VIOLATION_GRACE, then the violator's) keep its codes."""
        if self.fail_code:
            return
        notice = None
        if client_notice is not None:
            client_notice.decode()      # a text frame must be UTF-8 (UnicodeDecodeError)
            notice = text_frame(client_notice)
        if self.closed_by is None:
            self.closed_by, self.close_code, self.close_reason = "sidecar", client_code, client_reason
        if self.client.state == CLOSE_RECEIVED:
            client_code = NORMAL    # the answer to the client's own close (see on_close_frame)
        self.send_close(self.client, client_code, client_reason, False, notice)
        self.send_close(self.upstream, upstream_code, upstream_reason, False)

    def abort(self):
        """Drop both connections now, without closing handshakes."""
        self.client.drop()
        self.upstream.drop()

    def counters(self, int direction):
        return (self.c2u if direction == C2U else self.u2c).counters()

    def drop_left(self):
        """Drop a held-back leg whose peer has left. Its reading is paused (the other
        peer takes nothing) and uvloop polls a paused socket for nothing: its reset or
        end would be seen only once the other peer reads or writes, the session, its
        slots and the other connection kept until then. One getsockopt per paused leg
        (server._poll); an end after the peer's close frame is a half-close, and one
        with bytes still unread (its last messages, its close) is owed to the other
        peer: both kept. So are the bytes before a reset, for the close timeout
        (Leg.left_behind). A peer seen to leave here ended the session (on_lost),
        whatever is lost next."""
        cdef Leg leg
        cdef int left
        for leg in (self.client, self.upstream):
            if leg.state >= SHUT or leg.fd < 0 or leg.transport.is_reading():
                continue
            left = conduit_peer_left(leg.fd)
            if left == 3:
                leg.left_behind()
            elif left == 1 or (left == 2 and not leg.ended_after_close()):
                leg.drop()
                leg.peer_left = True

    def count_sent(self, int direction, Pipe scanned):
        """Count as relayed in `direction` the frames `scanned` (a Scanner) went through
        before the relay started: a provider's greeting, which its client reads before
        the first message the sidecar holds."""
        cdef Pipe pipe = self.c2u if direction == C2U else self.u2c
        cdef int i
        for i in range(KINDS):
            pipe.frames[i] += scanned.frames[i]
            pipe.payload[i] += scanned.payload[i]
            g_frames[pipe.direction][i] += scanned.frames[i]
            g_payload[pipe.direction][i] += scanned.payload[i]
        pipe.wire_bytes += scanned.wire_bytes
        g_wire[pipe.direction] += scanned.wire_bytes

    @property
    def finished(self):
        return self.done

    @property
    def activity(self):
        """Bytes relayed so far, both ways, a frame in flight as far as it has come (for
        idle detection: one long frame streaming for longer than the idle limit is not
        idle). A frame's bytes are counted at its start; what is still to come of it is
        taken off."""
        return <int64_t>(self.c2u.wire_bytes + self.u2c.wire_bytes) - <int64_t>(self.c2u.left + self.u2c.left)

    cdef int send_close(self, Leg leg, int code, str reason, bint finish,
                        bytes notice=None) except -1:
        """Our close to `leg` (after `notice`, if the leg is open), now or at the end of
        the frame in flight to it. `finish`: shut the socket once it is out."""
        cdef LegState s = leg.state
        cdef Pipe out = leg.outbound
        cdef bint last
        if s >= SHUT:
            return 0
        if s >= CLOSE_QUEUED:       # a close is out or queued already
            if s == CLOSE_QUEUED:
                if finish:
                    leg.set_state(CLOSE_QUEUED_LAST)
            elif s == CLOSED or (finish and s == CLOSE_SENT):
                leg.shut()
            return 0
        last = finish or s == CLOSE_RECEIVED
        frame = close_frame(code, reason, leg is self.upstream)
        if s != OPEN:
            notice = None
        if out.left and out.pending is None:    # (none of a withheld frame went to leg)
            leg.queued_notice = notice
            leg.queued_close = frame
            leg.set_state(CLOSE_QUEUED_LAST if last else CLOSE_QUEUED)
            if out.src.state == LOST:
                leg.drop()                  # that frame will never end
        else:
            if notice is not None and not out.fragmented:
                leg.write(<uint8_t*>PyBytes_AS_STRING(notice), PyBytes_GET_SIZE(notice))
            leg.write(<uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
            if leg.state < SHUT:            # (the write may have found the peer gone)
                if last:
                    leg.shut()
                else:
                    leg.set_state(CLOSE_SENT)
        return self.arm_deadline()

    cdef int on_close_frame(self, Pipe pipe, int code, object reason, Py_ssize_t size) except -1:
        cdef Leg src = <Leg>pipe.src, dst = <Leg>pipe.dst
        cdef LegState s = src.state
        cdef object told = reason
        cdef Py_ssize_t cut
        if reason and g_redact is not None:
            told = g_redact(reason)
        if self.closed_by is None:
            self.closed_by = "client" if src is self.client else "upstream"
            self.close_code, self.close_reason = code, told
        if s == OPEN:
            src.set_state(CLOSE_RECEIVED)
        elif s == CLOSE_QUEUED:
            src.set_state(CLOSE_QUEUED_LAST)
        elif s == CLOSE_SENT:
            src.set_state(CLOSED)
        if pipe.forwarding:                 # dst is OPEN or CLOSE_RECEIVED
            if pipe.dst_left:
                pass                        # nothing reaches it (Leg.left_behind): no frame of ours
            elif code == NO_STATUS and dst is self.client and dst.state == CLOSE_RECEIVED:
                # The provider's codeless answer to the client's close (the usual echo of
                # a close without a code) goes as 1000: with 1005 the documented client
                # reconnects after its own disconnect(). Its frame is not forwarded.
                pipe.forwarding = False
                frame = close_frame(NORMAL, "", False)
                dst.write(<uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
                pipe.payload[kind_of(8)] += 2     # counted as sent: its code's two bytes
                g_payload[pipe.direction][kind_of(8)] += 2
                pipe.wire_bytes += PyBytes_GET_SIZE(frame) - size
                g_wire[pipe.direction] += PyBytes_GET_SIZE(frame) - size
            elif told is not reason:
                # A secret in the reason: the frame goes with it redacted, of our
                # making (masked to the provider), counted as sent.
                pipe.forwarding = False
                frame = close_frame(code, told, dst is self.upstream)
                dst.write(<uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
                cut = len(reason.encode()) - len(told.encode())
                pipe.payload[kind_of(8)] -= cut
                g_payload[pipe.direction][kind_of(8)] -= cut
                pipe.wire_bytes += PyBytes_GET_SIZE(frame) - size
                g_wire[pipe.direction] += PyBytes_GET_SIZE(frame) - size
            dst.set_state(CLOSED if dst.state == CLOSE_RECEIVED else CLOSE_SENT)
        elif dst.inbound.verdict_code:
            # The other peer has answered our close: now tell the violator why.
            self.send_close(dst, self.fail_code, self.fail_reason, True)
        self.arm_deadline()
        # The frame itself is emitted after this returns; shut the sockets after it.
        self.loop.call_soon(self._after_close_frame)
        return 0

    def _after_close_frame(self):
        if self.client.state == CLOSED:
            self.client.shut()
        if self.upstream.state == CLOSED:
            self.upstream.shut()

    cdef int on_violation(self, Pipe pipe, int code, str reason) except -1:
        """Nothing more is read from the violator. The other peer is closed first (after
        VIOLATION_GRACE), and what it still sends (e.g. the answer to the violator's
        last good message) is delivered until its close arrives; then the violator
        gets `code`."""
        cdef Leg src = <Leg>pipe.src, dst = <Leg>pipe.dst
        side = "client" if src is self.client else "upstream"
        reason = "%s: %s" % (side, reason)
        if self.closed_by is None:
            self.closed_by, self.close_code, self.close_reason = "sidecar", code, reason
        self.fail_code, self.fail_reason = code, reason
        if src.state == OPEN:      # (after its close, nothing it sends is judged)
            src.set_state(FAILED)
        if src.state < SHUT:
            src.transport.pause_reading()
        if dst.state >= CLOSE_QUEUED:       # the other peer was closed, or is gone
            self.send_close(src, code, reason, True)
        else:
            # A moment for the other peer to answer what it already received (a
            # client's last good message, say) before it is told to close.
            self.loop.call_later(VIOLATION_GRACE, self._close_after_violation, dst)
            self.arm_deadline()
        return 0

    def _close_after_violation(self, Leg leg):
        cdef int code = self.fail_code
        if leg is self.client and leg.state == CLOSE_RECEIVED:
            code = NORMAL       # the answer to the client's own close (on_close_frame)
        elif leg is self.client and code != MESSAGE_TOO_BIG:
            # The provider broke the protocol: to the client an invalid response from
            # upstream (1014, RFC 6455), as a bad first message of the provider's is
            # (held.read_greeting). 1002 would say the client broke it, and the
            # documented client gives up on 1002.
            code = UPSTREAM_FAILED
        self.send_close(leg, code, self.fail_reason, False)

    cdef int on_lost(self, Leg leg) except -1:
        cdef Leg other = self.upstream if leg is self.client else self.client
        cdef Leg gone
        if other.state != LOST:
            if other.state == CLOSE_QUEUED or other.state == CLOSE_QUEUED_LAST:
                other.drop()        # our close waits for a frame that will never end
                return 0
            if self.closed_by is None:
                # A peer the poll saw leave left first, though its connection_lost comes
                # a loop turn after its drop, or at the close timeout (drop_left).
                gone = other if other.peer_left and not leg.peer_left else leg
                if gone is self.client:
                    self.closed_by, self.close_code = "client", CONNECTION_LOST
                    self.close_reason = "client connection lost"
                else:
                    self.closed_by, self.close_code = "upstream", CONNECTION_LOST
                    self.close_reason = "upstream connection lost"
            if other.state < CLOSE_QUEUED:  # no close went to it yet
                if other.inbound.verdict_code:
                    self.send_close(other, self.fail_code, self.fail_reason, True)
                elif leg is self.client:
                    self.send_close(other, GOING_AWAY, "client went away", True)
                else:
                    # The answer to a client's close is a normal closure (see on_close_frame).
                    self.send_close(other, NORMAL if other.state == CLOSE_RECEIVED else UPSTREAM_FAILED,
                                    "upstream connection lost", True)
            elif other.state == CLOSE_SENT and not other.inbound.verdict_code:
                # Our close is out: its answer is awaited (within the close timeout) and
                # what it still sends is read and dropped. Closed with its bytes unread,
                # the socket would be reset, and a peer still sending (an SDK streaming
                # audio) could lose our close frame to the reset. (A violator, read no
                # more, can never answer: it is shut.)
                other.transport.resume_reading()    # paused if `leg` held it back
            else:
                other.shut()
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
        """The close timeout: both connections are dropped, but a peer still owed a
        close gets it first, if the frames to it are at a boundary: a violator its
        code (the other peer never answered ours), a peer that closed the answer the
        other peer never gave."""
        cdef Leg leg
        for leg in (self.client, self.upstream):
            if leg.outbound is None or leg.outbound.left:
                continue
            if leg.state == FAILED:
                frame = close_frame(self.fail_code, self.fail_reason, leg is self.upstream)
            elif leg.state == CLOSE_RECEIVED and leg is self.client:
                # Still the answer to the client's close: a normal closure.
                frame = close_frame(NORMAL, "upstream did not answer the close", False)
            elif leg.state == CLOSE_RECEIVED:
                frame = close_frame(GOING_AWAY, "client did not answer the close", True)
            else:
                continue
            leg.write(<uint8_t*>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
            if leg.state == FAILED:
                leg.set_state(CLOSE_SENT)
                leg.shut()          # its lingering close (see shut), not the drop below
            elif leg.state == CLOSE_RECEIVED:
                leg.set_state(CLOSED)
        self.abort()


def totals():
    """Process totals: (frames[dir][kind], payload[dir][kind], wire[dir],
    histogram bucket counts, histogram sum in seconds)."""
    return (tuple(tuple(g_frames[d][k] for k in range(KINDS)) for d in range(2)),
            tuple(tuple(g_payload[d][k] for k in range(KINDS)) for d in range(2)),
            tuple(g_wire[d] for d in range(2)),
            tuple(g_hist[i] for i in range(HIST_BUCKETS + 1)),
            g_hist_sum_ns / 1e9)


cdef extern from *:
    """
    #ifdef __GLIBC__
    #include <malloc.h>
    #define conduit_malloc_trim() malloc_trim(0)
    #else
    #define conduit_malloc_trim() 0
    #endif
    """
    int conduit_malloc_trim()


def malloc_trim():
    """glibc's `malloc_trim(0)` (for conduit_sidecar.trim; here rather than through
    ctypes, whose import costs the process 0.2 MiB): 1 if memory was given back.
    Elsewhere (musl, macOS) there is no such call and this returns 0."""
    return conduit_malloc_trim()
