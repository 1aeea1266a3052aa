"""JSON-lines logging on stdout. Records carry structured fields via `extra`;
nothing secret is ever passed to a logger."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import sys
import time
import traceback
from typing import Any

import msgspec

__all__ = ["Limited", "info", "loop_error", "setup", "trace"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_encoder = msgspec.json.Encoder()
# A timestamp's milliseconds and zone, made once: formatted for each line they were
# a quarter of its cost.
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


class JSONFormatter(logging.Formatter):
    def __init__(self):
        super().__init__()
        self.second, self.stamp = -1, ""  # the last second formatted (one strftime a second)

    def line(self, created: float, level: str, name: str, msg: str, fields: dict[str, Any]) -> str:
        """The JSON line: the record's own keys, then `fields`."""
        second = int(created)
        if second != self.second:
            self.second, self.stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line = {
            "ts": self.stamp + _MILLIS[int((created - second) * 1000)],
            "level": level,
            "logger": name,
            "msg": msg,
        }
        line.update(fields)
        return _encoder.encode(line).decode()

    def format(self, record: logging.LogRecord) -> str:
        # A comprehension: a generator passed to update() costs 40% more.
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = trace(record.exc_info[1])
        return self.line(record.created, record.levelname.lower(), record.name, record.getMessage(), fields)


def trace(exc: BaseException) -> str:
    """A traceback with each exception's frames and type but not its message, causes
    and contexts first as Python prints them: a library's message can quote what it
    failed on, such as a header carrying a key."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)  # type: ignore[assignment]
    return "\n".join(
        "Traceback (most recent call last):\n"
        + "".join(traceback.format_tb(e.__traceback__))
        + f"{type(e).__module__}.{type(e).__qualname__} (message not logged)"
        for e in reversed(chain)
    )


def loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler: what escaped a callback, logged as a JSON
    line with `trace`. Not asyncio's own, whose message and reprs can hold a
    callback's arguments (bytes a client sent) and whose record nobody formats."""
    exc = context.get("exception")
    fields: dict[str, Any] = {"event": "loop_error"}
    if isinstance(exc, BaseException):
        fields["error"] = trace(exc)
    logging.getLogger("conduit.loop").error("an event loop callback failed", extra=fields)


def _unraisable(unraisable) -> None:
    fields: dict[str, Any] = {"event": "unraisable", "object": type(unraisable.object).__qualname__}
    if unraisable.exc_value is not None:
        fields["error"] = trace(unraisable.exc_value)
    logging.getLogger("conduit.unraisable").error("an exception Python could only ignore", extra=fields)


# Writes: 100 a second at most once a burst of 20 is spent. Under a high rate of
# lines (a session's end is logged thousands of times a second) a write per loop turn
# cost 4% of a session's CPU; below it, each line goes out when its turn ends.
_WRITE_EVERY = 0.01
_WRITES_AHEAD = 20


class LoopTurnHandler(logging.StreamHandler):
    """Lines logged during one turn of the event loop go out in one write at its end,
    not one system call each. Past a burst of _WRITES_AHEAD writes, one every
    _WRITE_EVERY: a line then waits for its write's turn (at most _WRITE_EVERY), and
    the lines logged meanwhile go with it. Outside a running loop each line is written
    at once; `logging.shutdown` flushes what a stopped loop left."""

    def __init__(self, stream):
        super().__init__(stream)
        self.lines: list[str] = []
        self.failing = False  # the last write failed (and was reported)
        # When the writes so far would have ended at one every _WRITE_EVERY (the
        # generic cell rate algorithm's theoretical arrival time): a burst of
        # _WRITES_AHEAD may go ahead of it.
        self.due = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add(line)

    def add(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) == 1:  # the first since the last write
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            wait = self.due - (_WRITES_AHEAD - 1) * _WRITE_EVERY - time.monotonic()
            if wait > 0:
                loop.call_later(wait, self.flush)
            else:  # once the turn ends
                loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # made by Handler.__init__
            lines, self.lines = self.lines, []
            try:
                if lines:
                    lines.append("")
                    self.write("\n".join(lines))
                    self.due = max(self.due, time.monotonic()) + _WRITE_EVERY
                self.stream.flush()
                self.failing = False
            except Exception:  # stdout gone: the lines are lost, never raised into the loop
                # Reported once, not at every turn (a traceback on stderr, 134 us each).
                if not self.failing:
                    self.failing = True
                    self.handleError(logging.makeLogRecord({"msg": f"{len(lines) - 1} log lines"}))

    def write(self, text: str) -> None:
        """`text` written whole. On a non-blocking stdout (O_NONBLOCK set by a parent
        that shares the pipe) that is full, Python's text stream loses the write without
        a word: written to the file here, it waits for room as a blocking one does."""
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError):  # not a file
            self.stream.write(text)
            return
        self.stream.flush()  # what was printed before, first
        data = memoryview(text.encode())
        while data:
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:
                select.select((), (fd,), ())


_ROOT = logging.getLogger("conduit")


def info(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """`logger.info(msg, extra=fields)`, the same line, without a LogRecord and the
    handler chain when nothing but `setup`'s handler would see it: a session's end is
    logged thousands of times a second, and the record cost 13% of a session's
    instructions. Any other handler or filter gets the record as usual."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handlers = _ROOT.handlers
    if (
        len(handlers) == 1
        and isinstance(handler := handlers[0], LoopTurnHandler)
        and logger.parent is _ROOT
        and logger.propagate
        and not (logger.handlers or logger.filters or _ROOT.filters or handler.filters)
        and handler.level <= logging.INFO
        and isinstance(formatter := handler.formatter, JSONFormatter)
    ):
        with handler.lock:  # type: ignore[union-attr]  # made by Handler.__init__
            handler.add(formatter.line(time.time(), "info", logger.name, msg, fields))
    else:
        logger.info(msg, extra=fields)


# The kinds a Limited keeps a second of at a time: past them, a line of a new kind is
# counted under its event's `other` (a reason is OpenSSL's, or a peer's doing).
_KINDS_MAX = 32


class Limited:
    """Lines a peer can cause at will, before any key is checked (a refusal, a
    handshake timeout): a flood of them is no flood of lines. Of each kind (the
    values of `kinds` in its fields: an event, a status or code, a reason) the first
    `per_second` in a second are logged; the rest are counted, and one line once the
    second is over says how many were not logged, so the flood still shows. At most
    _KINDS_MAX kinds are held at a time (and one `other` per event and field set)."""

    __slots__ = ("logger", "kinds", "per_second", "windows")

    def __init__(self, logger: logging.Logger, kinds: tuple[str, ...], per_second: int = 10):
        self.logger, self.kinds, self.per_second = logger, kinds, per_second
        self.windows: dict[tuple, _Window] = {}  # kind -> its second

    def info(self, msg: str, fields: dict[str, Any]) -> None:
        kind = tuple(fields.get(name) for name in self.kinds)
        now = time.monotonic()
        window = self.windows.get(kind)
        if window is None and len(self.windows) >= _KINDS_MAX:
            # Seconds over with nothing left to tell go; if none did, the line's kind
            # is its event's `other`.
            over = [k for k, w in self.windows.items() if now - w.start >= 1.0 and w.told is None]
            for k in over:
                del self.windows[k]
            if not over:
                kind = (kind[0], *(None if v is None else "other" for v in kind[1:]))
                window = self.windows.get(kind)
        if window is None or now - window.start >= 1.0 and window.told is None:
            window = self.windows[kind] = _Window(now)
        if window.logged < self.per_second:
            window.logged += 1
            info(self.logger, msg, fields)
            return
        if window.told is None:  # the first not logged: told when the second is over
            window.told = asyncio.get_running_loop().call_later(window.start + 1.0 - now, self._tell, kind)
        window.dropped += 1

    def _tell(self, kind: tuple) -> None:
        window = self.windows.pop(kind)
        fields: dict[str, Any] = {"event": "not_logged", "lines": window.dropped}
        for name, value in zip(self.kinds, kind, strict=True):
            if value is not None:  # (a kind without a status, say)
                fields["of" if name == "event" else name] = value
        info(self.logger, "lines not logged in the last second", fields)

    def flush(self) -> None:
        """Tell now what is not logged (at a stop, before the seconds are over)."""
        for kind, window in list(self.windows.items()):
            if window.told is not None:
                window.told.cancel()
                self._tell(kind)


class _Window:
    __slots__ = ("start", "logged", "dropped", "told")

    def __init__(self, start: float):
        self.start = start
        self.logged = self.dropped = 0
        self.told: asyncio.TimerHandle | None = None  # set at the first line not logged


def setup(level: str = "info") -> None:
    handler = LoopTurnHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    root = _ROOT
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Other libraries' warnings and errors (redis-py's, asyncio's) as JSON lines too, not
    # as Python's last resort prints them, plain text on stderr; never their debug lines,
    # whatever `level`: websockets' quote the headers it sends.
    logging.root.handlers[:] = [handler]
    logging.root.setLevel(logging.WARNING)
    # And Python's own: warnings (to the `py.warnings` logger) and exceptions it can
    # only ignore (in a `__del__`, a finalizer), whose default print also quotes the
    # object's repr.
    logging.captureWarnings(True)
    sys.unraisablehook = _unraisable
    # The lines carry none of the caller's file and line, thread or process: don't
    # look them up for every record (logging's documented switches, see its HOWTO's
    # "Optimization"); a session's end is logged thousands of times a second.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
