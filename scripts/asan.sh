#!/usr/bin/env bash
# Build the relay with AddressSanitizer + UndefinedBehaviorSanitizer into a scratch
# directory and run the scanner tests and the in-process relay tests (real sockets;
# both legs TLS with OpenSSL called from the relay in test_relay_tls) against that
# build. Fails on any report.
#   bash scripts/asan.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import Cython, setuptools" 2>/dev/null || python3 -m pip install -q Cython setuptools
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g -O1"
# A copy of the sources, so the editable install in this checkout is left alone.
cp setup.py _relay.pyx _relay.pxd _tls.h "$build"/
mkdir -p "$build/conduit_sidecar" "$build/tests" && cp conduit_sidecar/*.py "$build/conduit_sidecar/"
cp tests/test_scanner.py tests/test_scanner_properties.py tests/reference_parser.py \
   tests/test_relay_notice.py tests/test_relay_tls.py tests/conftest.py \
   "$build/tests/"
(cd "$build" && CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
   python3 setup.py -q build_ext --inplace >/dev/null 2>build.log) || { cat "$build/build.log"; exit 1; }
libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
# CPython's own allocations at exit are not ours: leak detection off.
export LD_PRELOAD="$libasan:$libubsan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONPATH="$build"
# Python objects from the system allocator: pymalloc's pools would hide over-reads of
# small buffers (e.g. a bytes object fed to the scanner) from ASan.
export PYTHONMALLOC=malloc
cd "$build"
python3 -c "import conduit_sidecar._relay as r, sys; assert r.__file__.startswith(sys.argv[1]), r.__file__; print('asan build:', r.__file__)" "$build"
# --capture=sys: a sanitizer report goes to the real stderr (fd capture would swallow it
# when the process aborts).
python3 -m pytest -q -p no:cacheprovider --capture=sys --rootdir "$build" tests
