"""Node.js clients with the npm `ws` package, shaped like the Conduit docs' classes."""

import json
import os
import shutil
import subprocess

import pytest

NODE_DIR = os.path.join(os.path.dirname(__file__), "node")

pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")) or not shutil.which("node"),
    reason="run `npm install --prefix tests/node` (the README's test command does)")


def node(script, *args, timeout=60):
    result = subprocess.run(["node", os.path.join(NODE_DIR, script), *args], capture_output=True,
                            text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def base(sidecar):
    return f"ws://127.0.0.1:{sidecar.port}"


def test_ws_client_frames_both_ways(sidecar):
    code, out = node("relay_test.mjs", base(sidecar), sidecar.keys.plain["good"])
    assert code == 0, out
    assert json.loads(out)["sessionCreated"]


@pytest.mark.parametrize("key", ["condt_unknown", None])
def test_resilient_client_does_not_reconnect_after_4001(sidecar, key):
    code, out = node("resilient_test.mjs", base(sidecar), key or sidecar.keys.plain["disabled"])
    result = json.loads(out)
    assert result["connects"] == 1, result
    assert result["closes"][0][0] == 4001
    assert result["closes"][0][1] in ("unknown key", "key disabled")
