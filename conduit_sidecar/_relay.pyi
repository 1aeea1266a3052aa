"""Types of the relay core's Python face (the extension built from _relay.pyx)."""

import asyncio
import enum
import ssl
from collections.abc import Callable

KIND_NAMES: tuple[str, str, str, str, str, str]
DIRECTION_NAMES: tuple[str, str]
HISTOGRAM_BOUNDS: tuple[float, ...]
SNIFF_BYTES: int
SNIFF_BYTES_MAX: int
NATIVE_TLS: bool  # TLS legs encrypted by OpenSSL from the relay (else uvloop's SSL transport)
TLS_BUFFERS_RELEASED: bool  # an idle TLS leg gives OpenSSL's record buffers back

class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    NO_STATUS = 1005
    CONNECTION_LOST = 1006
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

class LegState(enum.IntEnum):
    OPEN = 0
    CLOSE_RECEIVED = 1
    FAILED = 2
    CLOSE_QUEUED = 3
    CLOSE_QUEUED_LAST = 4
    CLOSE_SENT = 5
    CLOSED = 6
    SHUT = 7
    LOST = 8

# (frames per kind, payload bytes per kind, wire bytes)
_Counters = tuple[tuple[int, ...], tuple[int, ...], int]

def close_frame(code: int, reason: str, masked: bool) -> bytes: ...
def redact_close_reasons(redact: Callable[[str], str] | None) -> None: ...
def linger_closes(linger: Callable[[asyncio.Transport], bool] | None) -> None: ...
def tls_buffers_releasable(version: int) -> bool: ...

class TLSSession: ...

def tls_session(sslobj: ssl.SSLObject) -> TLSSession | None: ...
def tls_resume(sslobj: ssl.SSLObject, session: TLSSession) -> bool: ...
def tls_free_buffers(sslobj: ssl.SSLObject) -> bool: ...
def tls_keep_secrets(context: ssl.SSLContext) -> bool: ...
def tls_take_secret(sslobj: ssl.SSLObject) -> bytes | None: ...
def tls_key_update_owed(sslobj: ssl.SSLObject) -> bool: ...
def totals() -> tuple[
    tuple[tuple[int, ...], tuple[int, ...]],
    tuple[tuple[int, ...], tuple[int, ...]],
    tuple[int, int],
    tuple[int, ...],
    float,
]: ...
def scan_benchmark(data: bytes, masked: bool, repeat: int) -> int: ...
def malloc_trim() -> int: ...
def read_buffer(sizehint: int) -> memoryview: ...

class Endpoint:
    @property
    def state(self) -> LegState: ...

class Leg(Endpoint):
    """The asyncio buffered protocol of one socket (set on its transport by start)."""
    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def eof_received(self) -> bool: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...

class Pipe:
    def __init__(self, direction: int, masked: bool, max_message: int) -> None: ...
    @property
    def verdict_code(self) -> int: ...
    @property
    def verdict_reason(self) -> str | None: ...
    def counters(self) -> _Counters: ...

class Scanner(Pipe):
    def __init__(
        self,
        masked: bool,
        max_message: int = ...,
        record: bool = True,
        markers: tuple[bytes, ...] = (),
        meter_binary: bool = False,
        sniff_bytes: int = 256,
        read_whole_up_to: int = 0,
    ) -> None: ...
    def feed_bytes(self, data: bytes | bytearray | memoryview) -> None: ...
    @property
    def output(self) -> bytes: ...
    @property
    def frame_boundaries(self) -> list[int]: ...
    @property
    def metered(self) -> list[bytes]: ...

class Relay:
    on_message: Callable[[Relay, bytes], object] | None
    session: object
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_message: int,
        close_timeout: float,
        on_done: Callable[[Relay], object],
        markers: tuple[bytes, ...] = (),
        on_message: Callable[[Relay, bytes], object] | None = None,
        *,
        meter_binary: bool = False,
        sniff_bytes: int = 256,
        on_client_message: Callable[[Relay, bytes], object] | None = None,
        read_whole_max: int = ...,
    ) -> None: ...
    @property
    def client(self) -> Leg: ...
    @property
    def upstream(self) -> Leg: ...
    @property
    def closed_by(self) -> str | None: ...
    @property
    def close_code(self) -> int | None: ...
    @property
    def close_reason(self) -> str | None: ...
    @property
    def finished(self) -> bool: ...
    @property
    def activity(self) -> int: ...
    def start(
        self,
        client_transport: asyncio.BaseTransport,
        upstream_transport: asyncio.BaseTransport,
        client_early: bytes = b"",
        upstream_early: bytes = b"",
        client_tls: ssl.SSLObject | None = None,
        upstream_tls: ssl.SSLObject | None = None,
        client_kernel_tx: bool = False,
        upstream_kernel_tx: bool = False,
    ) -> None: ...
    def close(
        self,
        client_code: int,
        client_reason: str,
        upstream_code: int,
        upstream_reason: str,
        client_notice: bytes | None = None,
    ) -> None: ...
    def abort(self) -> None: ...
    def counters(self, direction: int) -> _Counters: ...
    def drop_left(self) -> None: ...
    def count_sent(self, direction: int, scanned: Pipe) -> None: ...
