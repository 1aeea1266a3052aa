"""What one provider usage report costs the governor (`Governor.usage`: price it, add
it to the key's pending usage, check the key's budgets against each of its live
sessions) as the pod holds more live sessions: of the same key (each is checked), and
of other keys (none should be looked at)."""

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
def test_usage_report(benchmark, report_row, sizes, column, peers, others):
    config = Config()
    sessions: set[SessionInfo] = set()
    by_key: dict[str, set[SessionInfo]] = {}
    for key_id, count in (("k", peers), *((f"o{i}", 1) for i in range(others))):
        key = entry(key_id)
        for _ in range(count):
            info = SessionInfo(key, "gpt-realtime", "openai")
            sessions.add(info)
            by_key.setdefault(key_id, set()).add(info)
    governor = Governor(config, Metrics(lambda: 0, lambda: 0, config.audio.bytes_per_second),
                        sessions, by_key, lambda model: model or "")
    info = next(iter(by_key["k"]))
    counts = {"input": 120.0, "output": 80.0}
    run = lambda: governor.usage(info, counts, "gpt-realtime")
    benchmark.group = "governor: one usage report"
    if sizes.quick:
        benchmark.pedantic(run, rounds=3, iterations=1)
    else:
        benchmark(run)
    assert governor.pending["k"]["tokens"] > 0 and not governor.live  # counted, nothing closed
    us = benchmark.stats.stats.median * 1e6
    report_row("governor", "µs per usage report", column, us)
