#!/usr/bin/env bash
# Fuzz the relay's frame scanner with atheris against the reference scanner.
#   bash scripts/fuzz.sh            # 60 s
#   bash scripts/fuzz.sh 600        # seconds
# Crashes and failing inputs land in .fuzz/ (reproduce: python fuzz/fuzz_scanner.py FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
python3 -c "import atheris" 2>/dev/null || python3 -m pip install -q atheris
mkdir -p .fuzz/corpus
exec python3 fuzz/fuzz_scanner.py .fuzz/corpus -max_total_time="$seconds" \
  -artifact_prefix=.fuzz/ -max_len=8192 -print_final_stats=1
