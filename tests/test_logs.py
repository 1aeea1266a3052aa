"""The JSON lines on stdout: one write per loop turn, and the session-end fast path
gives the line the logger would, and yields to any other handler or filter."""

import asyncio
import io
import json
import logging

import pytest

from conduit_sidecar import logs


class Counted(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += 1
        return super().write(s)


@pytest.fixture
def stream(monkeypatch):
    out = Counted()
    monkeypatch.setattr("sys.stdout", out)
    root = logging.getLogger("conduit")
    saved = root.handlers[:], root.level, root.propagate
    logs.setup("info")
    yield out
    root.handlers[:], root.level, root.propagate = saved


def _lines(out: Counted) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_lines_of_one_loop_turn_go_out_in_one_write_when_it_ends(stream):
    log = logging.getLogger("conduit.test")

    async def body():
        for i in range(3):
            log.info("hello", extra={"n": i})
        logs.info(log, "fast", {"n": 3})
        assert stream.getvalue() == ""  # not before the turn ends
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(body())
    assert [(line["msg"], line["n"]) for line in _lines(stream)] == [
        ("hello", 0), ("hello", 1), ("hello", 2), ("fast", 3)
    ]
    assert stream.writes == 1


def test_outside_a_loop_each_line_is_written_at_once(stream):
    logging.getLogger("conduit.test").warning("now", extra={"event": "x"})
    assert _lines(stream)[0]["level"] == "warning" and _lines(stream)[0]["event"] == "x"


def test_the_fast_path_line_is_the_loggers(stream):
    log = logging.getLogger("conduit.test")
    fields = {"event": "session_end", "session_id": "s1", "close_code": 1000, "usage_tokens": {"input": 3}}
    log.info("session ended", extra=fields)
    logs.info(log, "session ended", fields)
    slow, fast = _lines(stream)
    assert slow.pop("ts")[:4] == fast.pop("ts")[:4]
    assert list(slow.items()) == list(fast.items())


def test_the_fast_path_yields_to_other_handlers_filters_and_levels(stream):
    log = logging.getLogger("conduit.test")
    seen = []
    extra = logging.Handler()
    extra.emit = seen.append  # type: ignore[method-assign]
    log.addHandler(extra)
    try:
        logs.info(log, "to both", {"event": "a"})
    finally:
        log.removeHandler(extra)
    assert [r.event for r in seen] == ["a"] and _lines(stream)[0]["event"] == "a"

    handler = logging.getLogger("conduit").handlers[0]
    dropped = logging.Filter("elsewhere")  # passes no record of conduit.test
    handler.addFilter(dropped)
    try:
        logs.info(log, "filtered", {"event": "b"})
    finally:
        handler.removeFilter(dropped)
    logging.getLogger("conduit").setLevel("WARNING")
    logs.info(log, "below the level", {"event": "c"})
    assert [line["event"] for line in _lines(stream)] == ["a"]


def test_a_failed_write_loses_the_lines_and_raises_nothing(stream, capsys):
    def broken(_):
        raise BrokenPipeError(32, "Broken pipe")

    stream.write = broken  # type: ignore[method-assign]
    log = logging.getLogger("conduit.test")

    async def body():
        logs.info(log, "lost", {"event": "a"})
        log.info("lost too")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return logging.getLogger("conduit").handlers[0].lines

    assert asyncio.run(body()) == []  # nothing kept to grow without bound
    assert "Broken pipe" in capsys.readouterr().err
