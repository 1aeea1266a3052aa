"""What one provider usage report costs the governor (`Governor.usage`: price it, add
it to the key's pending usage, check the key's budgets) as the pod holds more live
sessions, of the same key and of other keys: none of them should be looked at while
no budget is crossed."""

import collections

import pytest

from conduit_sidecar.config import Config
from conduit_sidecar.governance import Governor
from conduit_sidecar.keys import Budget, KeyEntry
from conduit_sidecar.metrics import Metrics
from conduit_sidecar.session import SessionInfo


def entry(key_id: str) -> KeyEntry:
    return KeyEntry(id=key_id, sha256="0" * 64, budgets=[Budget("tokens", 1e12, "day")])


@pytest.mark.parametrize("column, peers, others", [
    ("alone", 1, 0), ("2000-other-keys", 1, 2000), ("2000-of-its-key", 2001, 0)])
def test_usage_report(benchmark, timed, report_row, column, peers, others):
    config = Config()
    sessions: set[SessionInfo] = set()
    entries = {key_id: entry(key_id) for key_id in ("k", *(f"o{i}" for i in range(others)))}
    for key_id, key in entries.items():
        sessions.update(SessionInfo(key, "gpt-realtime", "openai") for _ in range(peers if key_id == "k" else 1))
    live = collections.Counter(info.key_id for info in sessions)
    governor = Governor(config, Metrics(lambda: 0, lambda: 0, lambda: 0, config.audio.bytes_per_second),
                        sessions, live, lambda model: model or "", entries.get)
    info = next(i for i in sessions if i.key_id == "k")
    counts = {"input": 120.0, "output": 80.0}
    run = lambda: governor.usage(info, counts, "gpt-realtime", "gpt-realtime")
    benchmark.group = "governor: one usage report"
    timed(run)
    assert governor.pending["k"]["tokens"] > 0 and not governor.live  # counted, nothing closed
    us = benchmark.stats.stats.median * 1e6
    report_row("governor", "µs per usage report", column, us)
