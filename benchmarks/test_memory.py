"""The sidecar's memory seen from outside (benchmarks/memory.py): a fresh sidecar
process warmed by a stream of sessions, then RSS per idle session at `idle` and
2 × `idle` open sessions, and what is given back after they close and after a burst.
One run (a repeat would measure memory already grown); it asserts only that every
session opened."""

import pytest

from . import harness, memory


@pytest.mark.parametrize("column", ["sidecar", "sidecar-tls"])
def test_memory(sizes, report_row, column):
    try:
        harness.sidecar_command()
    except harness.Unavailable as exc:
        pytest.skip(str(exc))
    warm, idle, burst = sizes.memory
    # Quick mode's sessions are too few to be trimmed: no need to wait for the poller.
    figures = memory.run(warm, idle, burst, wait=1 if sizes.quick else 6, tls=column == "sidecar-tls")
    assert figures["sessions"] == 2 * idle + 2 * burst
    n = f"{idle:,}"
    rows = {"at rest (after the warm-up): MiB": "rest_mib",
            "of it private to the process (RssAnon): MiB": "rest_anon_mib",
            f"per idle session, 1 → {n} open: KiB": "kib_per_session_1k",
            f"per idle session, {n} → {2 * idle:,} open: KiB": "kib_per_session_2k",
            f"after the {2 * idle:,} idle sessions closed: MiB": "after_idle_mib",
            f"peak of a {burst:,}-session burst: MiB": "burst_peak_mib",
            "after the burst closed: MiB": "after_burst_mib",
            "after the burst / at rest": "after_burst_vs_rest",
            f"after {burst:,} more, 50 at a time / at rest": "after_paced_burst_vs_rest"}
    for row, key in rows.items():
        report_row("memory", row, column, figures[key])
