#!/usr/bin/env bash
# Headless Chromium for tests/test_browser.py: Debian's `chromium` package at /usr/bin/chromium.
#   bash scripts/install_browser.sh          # as root, or with passwordless sudo
# Does nothing if Chromium is already there. Without root (and without sudo -n), or
# without apt-get, it says so and exits 0: tests/test_browser.py then skips.
# The test also needs playwright-core in tests/node/node_modules (npm install --prefix tests/node).
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  echo "install_browser: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM") already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_browser: no apt-get; install Chromium at $CHROMIUM yourself (browser test skipped)" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "install_browser: not root; run 'sudo bash scripts/install_browser.sh' (browser test skipped)" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
# A fresh CI image often has empty package lists: update first then, or if the install fails.
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null \
   || ! "${as_root[@]}" apt-get install -y -q chromium; then
  "${as_root[@]}" apt-get update -q
  "${as_root[@]}" apt-get install -y -q chromium
fi
echo "install_browser: $("$CHROMIUM" --version 2>/dev/null) installed in $(( $(date +%s) - start )) s"
