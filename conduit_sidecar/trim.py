"""Giving memory back after a burst of sessions.

Sessions are freed by reference counting as they end, but glibc's malloc keeps the
freed chunks (uvloop's handles, transports' buffers, the relay's objects) for reuse,
so without this RSS would stay at the burst's peak for the life of the pod.
`malloc_trim(0)` returns every free page to the kernel, also those in the middle of
the heap. Elsewhere (musl, macOS) there is no such call and this does nothing.
"""

from __future__ import annotations

from . import _relay

__all__ = ["Trimmer"]


class Trimmer:
    """`grew(live)` on each new session, `check(live)` now and then: trims whenever
    the live count is `drop` sessions or more below its peak since the last trim,
    and once more when such a fall has ended (its last sessions may close fewer than
    `drop` at a time). `trim()` also after start-up, whose temporary objects leave
    free heap behind."""

    __slots__ = ("drop", "peak", "last", "falling")

    def __init__(self, drop: int = 256):
        self.drop = drop
        self.peak = self.last = 0
        self.falling = False  # a fall of `drop` or more is under way

    def grew(self, live: int) -> None:
        if live > self.peak:
            self.peak = live

    def check(self, live: int) -> bool:
        still_falling, self.last = live < self.last, live
        if self.peak - live >= self.drop:
            self.falling = True
        elif self.falling and not still_falling:
            self.falling = False
        else:
            return False
        self.peak = live
        self.trim()
        return True

    def trim(self) -> None:
        _relay.malloc_trim()
