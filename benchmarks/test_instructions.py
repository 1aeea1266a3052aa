"""User-space instructions of `serve` under callgrind (benchmarks/instructions.py)
per relayed frame of one session's round trips: 960-byte binary frames, and OpenAI
events the relay meters (per new session: `python -m benchmarks.instructions`).
Counts, not times: the figures to compare two builds by. Skipped without valgrind;
asserts only that a count came."""

import pytest

from . import harness, instructions

# row -> `--frames`
CASES = {"per relayed frame, 960-B binary": "audio",
         "per relayed frame, OpenAI events (metered)": "openai"}


@pytest.mark.parametrize("row", list(CASES))
def test_instructions(sizes, report_row, row):
    frames = CASES[row]
    warm, counted = sizes.instructions
    try:
        harness.sidecar_command()
        per = instructions.run(warm, counted, 4, frames=frames)
    except harness.Unavailable as exc:
        pytest.skip(str(exc))
    assert per > 0
    report_row("instructions", row, "sidecar", per)
