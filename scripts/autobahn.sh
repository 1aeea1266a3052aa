#!/usr/bin/env bash
# Autobahn|Testsuite (RFC 6455) through the sidecar; see docs/autobahn.md.
#   bash scripts/autobahn.sh                    # the three runs, gate, summary table
#   bash scripts/autobahn.sh --runs a --cases '1.*,5.*'
#   bash scripts/autobahn.sh --no-sidecar       # baselines only
# Needs Python 2.7 (pyenv's 2.7.18, or AUTOBAHN_PYTHON2) to install the suite into
# .autobahn/, and the project installed in the Python that runs this
# (`pip install -e .`; set PYTHON to pick another interpreter).
# Exit status: 0 no case worse through the sidecar, 1 some case worse, 2 harness error.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/autobahn/run.py "$@"
