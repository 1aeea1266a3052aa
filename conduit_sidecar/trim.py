"""Giving memory back after a burst of sessions.

Sessions are freed by reference counting as they end, but glibc's malloc keeps the
freed chunks (uvloop's handles, transports' buffers, the relay's objects) for reuse,
so without this RSS would stay at the burst's peak for the life of the pod.
`malloc_trim(0)` returns every free page to the kernel, also those in the middle of
the heap. Elsewhere (musl, macOS) there is no such call and this does nothing.

With CPython's own allocator, small objects live in 1 MiB arenas it returns only
once every object in one is freed, and a burst opened at once leaves many arenas that
a few objects keep; the image sets PYTHONMALLOC=malloc, which puts them in glibc's
heap, where the trim reaches them (docs/benchmarks.md, "A burst at once"). What a
burst leaves alive, once its sessions have ended, is kept by caches, not by
sessions: the interpreter's free lists (tuples, dicts, lists, floats, contexts),
uvloop's (250 `Handle`s and 250 `TimerHandle`s), and the type attribute cache, which
keeps the name of each of its last 4,096 lookups, among them the new `"dst"` string
`datetime.timetuple` makes for every `Date` header websockets writes
(docs/benchmarks.md, "Memory"). When a fall ends, `release` empties them so the memory
they hold can go.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys

from . import _relay

__all__ = ["Trimmer"]

_FREE_LIST = 250  # uvloop's DEFAULT_FREELIST_SIZE, per handle class
_CONTEXT = contextvars.Context()  # one for all spare handles (each would copy one)


def _noop() -> None:
    pass


def _handles() -> list[asyncio.Handle]:
    """As many `Handle`s and `TimerHandle`s as uvloop's free lists hold, cancelled:
    made while the lists are full, they are the lists' objects."""
    loop = asyncio.get_running_loop()
    handles = [loop.call_soon(_noop, context=_CONTEXT) for _ in range(_FREE_LIST)]
    handles += [loop.call_later(3600, _noop, context=_CONTEXT) for _ in range(_FREE_LIST)]
    for handle in handles:
        handle.cancel()
    return handles


class Trimmer:
    """`grew(live)` on each new session, `check(live)` now and then: trims whenever
    the live count is `drop` sessions or more below its peak since the last trim,
    and once more when such a fall has ended (its last sessions may close fewer than
    `drop` at a time), then also releasing the caches above. A light load's churn
    (sessions opening and closing a few at a time, never `drop` live) leaves free
    heap too, between pages that live objects keep, which no fall ever trims: with
    fewer than `drop` live, `drop` ended since the last trim, and the count not
    rising, a check trims. Not with more live: a trim pauses the loop for
    milliseconds on a large heap. `trim()` also after start-up, whose temporary
    objects leave free heap behind."""

    __slots__ = ("drop", "peak", "last", "falling", "spare", "opened", "base")

    def __init__(self, drop: int = 256):
        self.drop = drop
        self.peak = self.last = 0
        self.opened = self.base = 0  # sessions opened since the last trim, live then
        self.falling = False  # a fall of `drop` or more is under way
        # Handles made at rest, kept to refill uvloop's free lists in place of a
        # burst's (about 64 KiB); made at the first check, after start-up.
        self.spare: list[asyncio.Handle] | None = None

    def grew(self, live: int) -> None:
        self.opened += 1
        if live > self.peak:
            self.peak = live

    def check(self, live: int) -> bool:
        if self.spare is None:  # at start, and back from the free lists after a release
            self.spare = _handles()
        still_falling, rising, self.last = live < self.last, live > self.last, live
        if self.peak - live >= self.drop:
            self.falling = True
        elif self.falling and not still_falling:
            self.falling = False
            self.release()
        elif rising or live >= self.drop or self.base + self.opened - live < self.drop:
            return False
        self.peak = self.base = live
        self.opened = 0
        self.trim()
        return True

    def release(self) -> None:
        """Empty the free lists and the type cache. A full collection empties the
        interpreter's; it traverses only what start-up did not freeze, so its pause
        grows with the sessions still live, once per fall. uvloop's cannot be
        emptied, only refilled: the burst's handles are taken out, the spare put in
        their place, and the burst's, dropped by the loop on its next turn while the
        lists are full, go back to pymalloc; the next check takes the spare back."""
        burst = _handles()
        self.spare = None
        del burst
        gc.collect()
        sys._clear_type_cache()

    def trim(self) -> None:
        _relay.malloc_trim()
