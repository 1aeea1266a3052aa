#!/usr/bin/env bash
# Debian's nginx for the benchmarks' `nginx` column (needs root and apt-get).
# The benchmarks run it themselves with their own config; the package's service
# is not started here (and a container's policy-rc.d usually forbids it anyway).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends nginx-light || apt-get install -y -qq --no-install-recommends nginx
