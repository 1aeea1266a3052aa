#!/usr/bin/env bash
# Installs the lowest runtime dependency versions pyproject.toml allows into their own
# virtualenv and runs the core and admin tests against them: a floor that is not true
# fails here, not on a user's machine.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-min
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" scripts/min_deps.py pyproject.toml > "$venv/constraints.txt"
echo "min_deps: $(tr '\n' ' ' < "$venv/constraints.txt")"
# (jsonpatch and kubernetes-validate: test_k8s imports them; the floors pin what they share.)
"$venv/bin/python" -m pip install -q -r "$venv/constraints.txt" pytest pytest-xdist jsonpatch kubernetes-validate
# The checkout's sources (and the relay scripts/test.sh built into it) are what is
# tested, run from it; every dependency comes from this venv. test_tls covers the
# cryptography floor, test_governance the redis one: its tests marked local_state (our
# policy on the process's own counts, no Redis client) reach no dependency the other
# files do not, and the main run has them. The test_k8s selection covers the pyyaml
# floor (`inject -f`) and the h11 one (the webhook's HTTP/1.1).
"$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir=. -c pyproject.toml -n 2 --dist loadscope \
    -m "not local_state" \
    tests/test_relay.py tests/test_close_codes.py tests/test_operations.py \
    tests/test_key_reload.py tests/test_limits.py tests/test_governance.py tests/test_tls.py \
    tests/test_k8s.py -k "not test_k8s or inject_file or webhook_injects or webhook_malformed_requests" "$@"
