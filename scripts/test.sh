#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs it.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k relay   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/include/openssl/ssl.h ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  # OpenSSL's headers: the relay then encrypts TLS legs itself (else uvloop's SSL transport).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libssl-dev \
    >/dev/null 2>&1 || echo "test.sh: libssl-dev not installed; TLS legs will use uvloop's SSL"
fi
python3 -m pip install -q -e ".[test]"          # compiles _relay.pyx into conduit_sidecar._relay
# Bytecode for the checkout, which an editable install leaves uncompiled: where
# PYTHONDONTWRITEBYTECODE is set, every sidecar a test starts would compile it again.
python3 -m compileall -q conduit_sidecar benchmarks >/dev/null
if command -v npm >/dev/null; then
  npm install --loglevel=error --no-audit --no-fund --prefix tests/node   # ws, openai, @google/genai, @deepgram/sdk, playwright-core
fi
if [ ! -x tests/agents/.venv/bin/python ]; then
  # openai-agents and LiveKit's OpenAI plugin, apart: openai-agents pins websockets<17.
  python3 -m venv tests/agents/.venv
fi
tests/agents/.venv/bin/pip install -q -r tests/agents/requirements.txt   # ~3 min, ~450 MB the first time
bash scripts/install_browser.sh                 # Debian's chromium, for tests/test_browser.py
if ! command -v promtool >/dev/null && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  # promtool (in Debian's prometheus package) checks the /metrics exposition.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
    >/dev/null 2>&1 || echo "test.sh: promtool not installed; its check will be skipped"
fi

if ! command -v ss >/dev/null && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  # ss (iproute2) reads the kernel's socket buffers for the memory-limit tests.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 \
    >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends iproute2 >/dev/null; }
fi

if ! command -v redis-server >/dev/null && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  # The governance tests start their own redis-server on a free loopback port.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
    >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
fi

python3 -m ruff check conduit_sidecar                 # lint, format and types: configured in pyproject.toml
python3 -m ruff format --check conduit_sidecar
python3 -m mypy
# Two workers, each module on one (its fixtures start once): most tests wait on
# sockets and timers. Then the tests marked `alone` (measurements another test's load
# would move, Autobahn's harness) by themselves (exit status 5: the arguments selected none).
python3 -m pytest -q -n 2 --dist loadscope -m "not alone" "$@" tests
python3 -m pytest -q -m alone "$@" tests || [ $? -eq 5 ]
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  # Kernel TLS where the kernel has it: this machine's may not, so the relay's TLS tests
  # run again in a VM on Debian's kernel (qemu; KVM if it boots, else emulated, ~2 min).
  # 125: the VM itself could not be set up (no package mirror): said, not failed.
  python=$(command -v python3)
  bash scripts/ktls-vm.sh sh -c "$python -c 'from conduit_sidecar import ktls; r = ktls.probe(); \
assert r is None, r' && $python -m pytest -q -p no:cacheprovider tests/test_ktls.py \
tests/test_relay_tls.py tests/test_tls.py -k 'ktls or relay_tls or kernel'" \
    || { rc=$?; [ "$rc" -eq 125 ] || exit "$rc"; echo "test.sh: no VM for the kernel TLS tests"; }
fi
bash scripts/min_deps.sh                        # the core tests on the declared dependency floors
bash scripts/asan.sh                            # the scanner tests on an ASan+UBSan build
if compgen -G "benchmarks/test_*.py" >/dev/null; then
  CONDUIT_BENCH_QUICK=1 python3 -m pytest -q benchmarks      # proves the suite runs; no figures
fi
