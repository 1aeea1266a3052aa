"""TLS legs the relay encrypts itself (`_relay.NATIVE_TLS`): until the relay takes
the socket, a `TLSStream` runs the TLS handshake and carries the HTTP upgrade over
an `ssl.SSLObject` and two memory BIOs, on a plain uvloop transport. It is the
transport the handshake protocols see; `handover` gives the relay the plain
transport and the SSLObject (records not yet read stay in its BIO for the relay).

Verification, SNI, the hostname check, the minimum version and every handshake
exception are the SSLContext's and the SSLObject's, as with uvloop's SSL transport
(which wraps the same object). Without NATIVE_TLS the callers keep uvloop's
transport (`loop.start_tls`, `create_server(ssl=...)`).

`SessionCache` keeps the provider legs' TLS sessions for resumption. With kernel
TLS on (`ktls`), `handover` gives a leg's sends to the kernel where it can.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from . import _relay, ktls

__all__ = ["SessionCache", "TLSStream", "handover", "start_tls"]

_READ = 65536
_DETACHED = asyncio.Protocol()  # the app of a stream the relay took (shared, does nothing)
# After close(), what is still to send has this long to reach the peer: uvloop's
# transport would wait for ever for one that never reads (the connection uncounted).
_CLOSE_SECONDS = 5.0
# OpenSSL makes room for a handshake message as soon as its 4-byte header is read, as
# large as the header says (a ClientHello: up to 128 KiB, zero-filled), before any of
# it came: 9 bytes of a connection held 123 KiB of the server. A real ClientHello is a
# few KiB; one that fits the 16 KiB each handshake sets up at its start costs no more.
_HELLO_MAX = 16384 - 4
# What one write to a stream's memory BIO holds at most (see data_received).
_PIECE = 4096
# A ServerHello with this random is a HelloRetryRequest (RFC 8446 4.1.3).
_RETRY_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def _quickack(raw) -> None:
    sock = raw.get_extra_info("socket")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except (AttributeError, OSError):  # not Linux, or not TCP
        pass


class TLSStream(asyncio.Protocol, asyncio.Transport):
    """The protocol of a plain transport and the transport of `app`, with TLS
    between them. Server side: `app` is told of the connection at once (its own
    timer then covers the TLS handshake too). Client side: see `start_tls`."""

    raw: asyncio.Transport  # the plain transport, from connection_made on

    def __init__(
        self,
        context: ssl.SSLContext,
        app: asyncio.Protocol,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: _relay.TLSSession | None = None,
    ):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        if ktls.enabled:
            _relay.tls_keep_secrets(context)
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side, server_hostname)
        if session is not None:
            _relay.tls_resume(self.sslobj, session)
        self.app = app
        self.server_side = server_side
        self.handshaken = False
        self.waiter: asyncio.Future | None = None  # the client's handshake
        self.paused = False  # by the app
        self.blocked = False  # the socket's write buffer is past its high-water mark
        self.guarded = True  # until unguard(): blocked stops the reading
        self.closing = False
        self.ender: asyncio.TimerHandle | None = None  # of a closed stream with bytes left to send
        # While kernel TLS is on: records sent under this side's first application
        # traffic secret, or -1 once a key update (owed to the peer, sent with a
        # write) moved past it, or OpenSSL wrote a record of its own after the handshake.
        self.records = 0
        self.failed: Exception | None = None  # why the handshake failed (told to the app)
        self.hellos = _Hellos() if server_side else None  # until no ClientHello can come

    # protocol of the plain transport

    def connection_made(self, raw):
        self.raw = raw
        if self.server_side:
            self.app.connection_made(self)
        else:
            self._handshake()  # the ClientHello

    def data_received(self, data):
        if self.hellos is not None:
            data = self._screen(data)
            if data is None:
                return
        if len(data) > _PIECE:
            # A memory BIO keeps for good the room its largest write took: a read goes
            # to it in pieces, each taken before the next, while the app takes them.
            view, at = memoryview(data), 0
            while len(data) - at > _PIECE and self._taking():
                self.incoming.write(view[at : at + _PIECE])
                at += _PIECE
                self._take()
            if self.raw.is_closing():
                return
            data = view[at:]
        self.incoming.write(data)
        self._take()

    def _take(self):
        if self.handshaken or self._handshake():
            self._deliver()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if self.ender is not None:
            self.ender.cancel()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("connection lost during the TLS handshake"))
        if self.server_side or self.handshaken:
            self.app.connection_lost(exc or self.failed)
        # The app (a handshake protocol) refers to this stream: part them, so that a
        # connection that ended before the handover is freed by reference counting.
        self.app = _DETACHED

    def pause_writing(self):
        # OpenSSL answers some records on its own (a key update request, a TLS 1.2
        # renegotiation's ClientHello): a peer that reads none of the answers is read
        # no further, so that they cannot pile up here.
        if self.guarded:
            self.blocked = True
            self.raw.pause_reading()
        self.app.pause_writing()

    def resume_writing(self):
        self._unblock()
        self.app.resume_writing()

    def unguard(self) -> None:
        """From here on a full write buffer stops no reading: the app's flow control
        decides (the sidecar's, once a request is read: a client that has not read a
        long greeting must still be read for its first message, within its limits)."""
        self.guarded = False
        self._unblock()

    def _unblock(self) -> None:
        if self.blocked:
            self.blocked = False
            if not self.paused:
                self._read_again()

    def _screen(self, data: bytes) -> bytes | None:
        """Server side: the client's records are read ahead of OpenSSL for its
        ClientHellos' headers. Returns what is left for the BIO, or None when a
        ClientHello is too large (the connection is dropped, as for a failed handshake)."""
        hellos = self.hellos
        assert hellos is not None
        at, found = hellos.scan(data, 0)
        while found == "ccs":
            # A ClientHello follows a change_cipher_spec only after a HelloRetryRequest
            # (TLS 1.2 encrypts what follows): OpenSSL answers what came before it first.
            self.incoming.write(data[:at])
            data = data[at:]
            self._handshake()
            if self.raw.is_closing():
                return None
            at, found = hellos.scan(data, 0) if hellos.retried else (0, "done")
        if found == "large":
            self.failed = ssl.SSLError(f"ClientHello over {_HELLO_MAX} bytes")
            self.failed.reason = "EXCESSIVE_MESSAGE_SIZE"  # OpenSSL's name for one over its own limit
            self.raw.abort()
            return None
        if found == "done":
            self.hellos = None
        return data

    def _handshake(self) -> bool:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # the alert, if any
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)
            else:
                self.failed = exc
                self.raw.abort()
            return False
        # A server's last flight is its session tickets, under its application secret;
        # a client's is its Finished, under the handshake secret.
        self.handshaken = self.server_side
        self._flush()
        self.handshaken = True
        self.hellos = None
        if self.server_side:
            # The listener sends no session tickets (tls.ListenerTLS), so nothing carries
            # the ACK of the client's Finished: a client with Nagle's algorithm on would
            # hold its request for our delayed ACK (40 ms). Send the ACK now.
            _quickack(self.raw)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        return True

    def _taking(self) -> bool:
        """Whether decrypted bytes go to the app now: not while it pauses, a full
        write buffer blocks reading, or the socket closes."""
        return not (self.paused or self.blocked or self.raw.is_closing())

    def _deliver(self):
        """Decrypted bytes to the app, until it pauses (the rest stays for the relay,
        or for its next resume_reading); the socket is read again only once every
        record read so far was taken."""
        while self._taking():
            try:
                data = self.sslobj.read(_READ)
            except ssl.SSLWantReadError:
                # A provider's session tickets leave OpenSSL's 16 KiB read buffer set up
                # while the leg waits for its 101 (the relay frees an idle leg's too).
                _relay.tls_free_buffers(self.sslobj)
                self.raw.resume_reading()
                break
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError:
                self.raw.abort()
                return
            if not data:
                if not self.app.eof_received():
                    self.close()
                break
            self.app.data_received(data)
        self._flush(ours=False)

    def _flush(self, ours: bool = True):
        """Records to the socket; `ours`: they encrypt what was written (or tickets)."""
        data = self.outgoing.read()
        if data:
            if self.hellos is not None and data[5:6] == b"\x02" and data[11:43] == _RETRY_RANDOM:
                self.hellos.retried = True
            if ktls.enabled and self.handshaken and self.records >= 0:
                self.records = self.records + _count_records(data) if ours else -1
            self.raw.write(data)

    # transport of the app

    def write(self, data):
        if self.closing:
            return
        if ktls.enabled and self.handshaken and _relay.tls_key_update_owed(self.sslobj):
            self.records = -1  # this write sends the key update, then records under new keys
        try:
            self.sslobj.write(data)
        except ssl.SSLError:
            self.raw.abort()
            return
        self._flush()

    def close(self):
        if self.closing:
            return
        self.closing = True
        # Not to a socket already closed (the peer's end read): uvloop raises there.
        if self.handshaken and not self.raw.is_closing():
            try:
                self.sslobj.unwrap()  # close_notify; the peer's is not awaited
            except ssl.SSLError:
                pass
            self._flush()
        if self.raw.get_write_buffer_size():
            self.ender = asyncio.get_running_loop().call_later(_CLOSE_SECONDS, self.raw.abort)
        self.raw.close()

    def abort(self):
        self.closing = True
        self.raw.abort()

    def is_closing(self):
        return self.closing or self.raw.is_closing()

    def pause_reading(self):
        self.paused = True
        self.raw.pause_reading()

    def resume_reading(self):
        self.paused = False
        if not self.blocked:
            self._read_again()

    def _read_again(self):
        if self.handshaken:  # records already in the BIO first (_deliver resumes the socket)
            asyncio.get_running_loop().call_soon(self._deliver)
        else:
            self.raw.resume_reading()

    def set_protocol(self, protocol):
        self.app = protocol

    def get_protocol(self):
        return self.app

    def get_write_buffer_size(self):
        return self.raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high=None, low=None):
        self.raw.set_write_buffer_limits(high, low)

    def send_in_kernel(self) -> bool:
        """Give this stream's sends to the kernel (`ktls`), if all it needs is at hand;
        the kept secret is erased either way."""
        secret = _relay.tls_take_secret(self.sslobj)
        if secret is None or self.records < 0 or _relay.tls_key_update_owed(self.sslobj):
            return False
        if self.raw.get_write_buffer_size():
            return False  # (records the transport holds are encrypted already)
        cipher = self.sslobj.cipher()
        if cipher is None or cipher[0] not in ktls.CIPHERS or self.sslobj.version() != "TLSv1.3":
            return False
        try:
            ktls.send_in_kernel(self.raw.get_extra_info("socket"), cipher[0], secret, self.records)
        except OSError:
            return False
        return True

    def get_extra_info(self, name, default=None):
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.sslobj.context
        if name == "peercert":
            return self.sslobj.getpeercert()
        return self.raw.get_extra_info(name, default)


async def start_tls(
    raw: asyncio.Transport,
    app: asyncio.Protocol,
    context: ssl.SSLContext,
    server_hostname: str,
    session: _relay.TLSSession | None = None,
) -> TLSStream:
    """The client's TLS handshake on `raw` (whose protocol `app` already is), offering
    `session` for resumption; raises what the SSLObject raises
    (ssl.SSLCertVerificationError, ...)."""
    stream = TLSStream(context, app, server_hostname=server_hostname, session=session)
    stream.waiter = asyncio.get_running_loop().create_future()
    raw.set_protocol(stream)
    stream.connection_made(raw)
    await stream.waiter
    return stream


class _Hellos:
    """The client's records during a server handshake, read ahead of OpenSSL, for the
    header of each ClientHello (the first, and after a HelloRetryRequest the second)."""

    __slots__ = ("record", "left", "type", "header", "body", "retried")

    def __init__(self):
        self.record = b""  # a record header's first bytes
        self.left = 0  # of the current record's body
        self.type = 0  # of the current record
        self.header = b""  # a handshake message header's first bytes
        self.body = 0  # left of the current handshake message
        self.retried = False  # the server sent a HelloRetryRequest

    def scan(self, data: bytes, at: int) -> tuple[int, str]:
        """Reads `data` from `at`: (len(data), "more") when all was read; else where it
        stopped and why: "large" (a ClientHello over _HELLO_MAX), "ccs" (a
        change_cipher_spec record ended there) or "done" (a record, not an alert, or a
        message that is no ClientHello: nothing more to check)."""
        end = len(data)
        while at < end:
            if not self.left:
                take = min(5 - len(self.record), end - at)
                self.record += data[at : at + take]
                at += take
                if len(self.record) < 5:
                    break
                self.type, self.left = self.record[0], int.from_bytes(self.record[3:5], "big")
                self.record = b""
                if self.type not in (20, 21, 22):  # not change_cipher_spec, alert, handshake
                    return at, "done"
                continue
            stop = at + min(self.left, end - at)
            self.left -= stop - at
            if self.type != 22:
                # An alert is passed over: OpenSSL reads on past a warning one (in TLS
                # 1.3 user_canceled), and a ClientHello may still follow it.
                at = stop
                if self.type == 20 and not self.left:
                    return at, "ccs"
                continue
            while at < stop:
                if self.body:
                    take = min(self.body, stop - at)
                    self.body -= take
                    at += take
                    continue
                take = min(4 - len(self.header), stop - at)
                self.header += data[at : at + take]
                at += take
                if len(self.header) == 4:
                    kind, self.body = self.header[0], int.from_bytes(self.header[1:4], "big")
                    self.header = b""
                    if kind != 1:
                        return at, "done"
                    if self.body > _HELLO_MAX:
                        return at, "large"
        return at, "more"


def _count_records(data: bytes) -> int:
    """TLS records in `data` (whole records: what OpenSSL wrote to its BIO)."""
    count = at = 0
    while at < len(data):
        at += 5 + int.from_bytes(data[at + 3 : at + 5], "big")
        count += 1
    return count


def handover(transport: asyncio.Transport) -> tuple[asyncio.Transport, ssl.SSLObject | None, bool]:
    """(the transport for the relay, the SSLObject it decrypts with or None, whether
    the kernel encrypts the sends; else the SSLObject does that too)."""
    if isinstance(transport, TLSStream):
        transport.paused = True  # a _deliver still scheduled must not read the relay's records
        # The handshake protocol and this stream refer to each other: part them, so that
        # both are freed by reference counting once the relay has the transport.
        transport.app = _DETACHED
        return transport.raw, transport.sslobj, ktls.enabled and transport.send_in_kernel()
    return transport, None, False


class SessionCache:
    """The newest TLS session of each provider endpoint, offered when the next leg to
    it starts. A resumed handshake (TLS 1.3 or 1.2 session tickets) skips the
    certificate chain, whose parsing and verification were the larger part of a
    full handshake's CPU in the sidecar. Only a session from a handshake that was
    verified with the same context (trust store and `ca_file`), for the same name
    (SNI and the hostname check) and port is ever offered: the key is all three. The
    server decides whether a ticket is still good (its lifetime, its keys); a
    refused one costs a full, verified handshake. At most `size` endpoints, the one
    used longest ago dropped. The sessions are the relay's copies
    (`_relay.TLSSession`), never an SSL's own."""

    __slots__ = ("size", "sessions")

    def __init__(self, size: int = 64):
        self.size = size
        self.sessions: dict[tuple[ssl.SSLContext, str, int], _relay.TLSSession] = {}

    def get(self, context: ssl.SSLContext, host: str, port: int) -> _relay.TLSSession | None:
        return self.sessions.get((context, host, port))

    def keep(self, host: str, port: int, sslobj: ssl.SSLObject) -> None:
        """After a leg's upgrade: its session, with the tickets read by then (a
        server may take each only once), replaces the endpoint's."""
        key = (sslobj.context, host, port)
        session = _relay.tls_session(sslobj)
        self.sessions.pop(key, None)  # entered again below, as the newest
        if session is None:
            return
        if len(self.sessions) >= self.size:
            del self.sessions[next(iter(self.sessions))]
        self.sessions[key] = session

    def forget(self, context: ssl.SSLContext, host: str, port: int) -> None:
        """A handshake to the endpoint failed: the next one starts afresh."""
        self.sessions.pop((context, host, port), None)
