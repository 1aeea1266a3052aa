"""Giving memory back after a burst of sessions.

Sessions are freed by reference counting as they end, but glibc's malloc keeps the
freed chunks (uvloop's handles, transports' buffers, the relay's objects) for reuse,
so without this RSS would stay at the burst's peak for the life of the pod.
`malloc_trim(0)` returns every free page to the kernel, also those in the middle of
the heap. Elsewhere (musl, macOS) there is no such call and this does nothing.
"""

from __future__ import annotations

__all__ = ["Trimmer"]


class Trimmer:
    """`grew(live)` on each new session, `check(live)` now and then: trims once the
    live count, `drop` sessions or more below its peak since the last trim, has
    stopped falling (so a burst's end is trimmed once, after its last session).
    `trim()` also after start-up, whose temporary objects leave free heap behind."""

    __slots__ = ("drop", "peak", "last", "_trim")

    def __init__(self, drop: int = 256):
        self.drop = drop
        self.peak = self.last = 0
        self._trim = None

    def grew(self, live: int) -> None:
        if live > self.peak:
            self.peak = live

    def check(self, live: int) -> bool:
        falling, self.last = live < self.last, live
        if falling or self.peak - live < self.drop:
            return False
        self.peak = live
        self.trim()
        return True

    def trim(self) -> None:
        if self._trim is None:
            self._trim = _malloc_trim()
        self._trim()


def _malloc_trim():
    import ctypes       # only once there is something to give back

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)
