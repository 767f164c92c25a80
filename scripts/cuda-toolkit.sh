#!/usr/bin/env bash
# A CUDA 13.0 toolkit from NVIDIA's wheels on the Python package index, for building slotserve
# with `--features cuda` (or `cudnn`) on a machine that has no CUDA installed, GPU or not.
#
#   scripts/cuda-toolkit.sh [--cudnn] [DIR]          install, then print `export` lines
#   eval "$(scripts/cuda-toolkit.sh [--cudnn] [DIR])"  the same, exported into this shell
#   . scripts/cuda-toolkit.sh [--cudnn] [DIR]          the same, when sourced from bash
#
# DIR defaults to .cuda-toolkit in the repository (git-ignored). The wheels are pinned with
# their hashes in scripts/cuda/toolkit.txt (and scripts/cuda/cudnn.txt with --cudnn); they are
# installed once (again only when those pins change) with `pip install --target`, then laid out
# the way CUDA's build tools expect a toolkit:
#   DIR/bin/nvcc (with ptxas, cicc under nvvm/), DIR/include, DIR/lib64 with the unversioned
#   links (libcudart.so, libcublas.so, ...), DIR/targets/x86_64-linux/{include,lib} for nvcc,
#   and DIR/lib64/stubs/libcuda.so: a link-time stand-in for the driver library, which the
#   wheels do not ship (the real libcuda.so.1 comes with the NVIDIA driver at run time).
# The exports are CUDA_ROOT, CUDA_PATH and CUDA_HOME (the toolkit), NVCC, PATH (DIR/bin first)
# and LD_LIBRARY_PATH (DIR/lib64 first, never the stubs).
# Needs python3 with pip, and a C compiler for the driver stub. Logs go to stderr.

# Sourced: install in a child shell, then export its answer here.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  _cuda_toolkit_env="$(bash "${BASH_SOURCE[0]}" "$@")" && eval "$_cuda_toolkit_env"
  _cuda_toolkit_rc=$?
  unset _cuda_toolkit_env
  return $_cuda_toolkit_rc
fi

set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"

CUDNN=0
DIR="$REPO/.cuda-toolkit"
for arg in "$@"; do
  case "$arg" in
    --cudnn) CUDNN=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) DIR="$arg" ;;
  esac
done
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

log() { echo "cuda-toolkit: $*" >&2; }

# The stamp lists the hash of each pin file installed; a toolkit installed with cuDNN also
# serves builds without it, and asking for cuDNN adds it.
STAMP="$DIR/.installed"
pins_hash() { sha256sum "$1" | cut -d' ' -f1; }
installed() { grep -qx "$(pins_hash "$1")" "$STAMP" 2>/dev/null; }
installed "$REPO/scripts/cuda/cudnn.txt" && CUDNN=1
REQUIREMENTS=("$REPO/scripts/cuda/toolkit.txt")
[ "$CUDNN" = 1 ] && REQUIREMENTS+=("$REPO/scripts/cuda/cudnn.txt")

# pip --target merges the wheels' shared nvidia/cu13 folder only within one call, so every
# wheel goes in one call, into a fresh folder that replaces the old one whole.
install_wheels() {
  local fresh="$DIR/pkgs.new"
  rm -rf "$fresh"
  local args=()
  for r in "${REQUIREMENTS[@]}"; do args+=(-r "$r"); done
  log "installing $(cat "${REQUIREMENTS[@]}" | grep -c '^nvidia') wheels into $DIR/pkgs"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-cache-dir --no-deps \
    --only-binary=:all: --require-hashes --target "$fresh" "${args[@]}" >&2
  rm -rf "$DIR/pkgs"
  mv "$fresh" "$DIR/pkgs"
}

# A shared library named libcuda.so.1 that defines every driver API function of cuda.h
# (versioned names such as cuMemAlloc_v2 and the plain ones), so that programs link against
# it; at run time the loader finds the driver's own libcuda.so.1 instead.
build_driver_stub() {
  local root="$1" src
  src="$(mktemp --suffix=.c)"
  {
    cc -E -P -I"$root/include" "$root/include/cuda.h"
    grep -hoE '^#define[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]+cu[A-Za-z0-9_]+' "$root/include/cuda.h"
  } | grep -oE '\bcu[A-Z][A-Za-z0-9_]*\b' | sort -u \
    | awk '{ print "void " $1 "(void) {}" }' >"$src"
  mkdir -p "$root/lib/stubs"
  cc -shared -fPIC -o "$root/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$src"
  rm -f "$src"
}

# Everything that turns the wheels' nvidia/cu13 folder into a toolkit.
lay_out() {
  local root="$DIR/pkgs/nvidia/cu13"
  ln -sfn lib "$root/lib64"
  mkdir -p "$root/targets/x86_64-linux"
  ln -sfn ../../include "$root/targets/x86_64-linux/include"
  ln -sfn ../../lib "$root/targets/x86_64-linux/lib"
  if [ "$CUDNN" = 1 ]; then
    local cudnn="$DIR/pkgs/nvidia/cudnn"
    for f in "$cudnn"/include/*.h "$cudnn"/lib/lib*.so.*; do
      ln -sfn "../../cudnn/${f#"$cudnn/"}" "$root/${f#"$cudnn/"}"
    done
  fi
  # Unversioned names for the linker: libcublas.so -> libcublas.so.13, ...
  for f in "$root"/lib/lib*.so.*; do
    local name="${f##*/}"
    ln -sfn "$name" "$root/lib/${name%%.so.*}.so"
  done
  build_driver_stub "$root"
  for entry in bin include lib lib64 nvvm targets; do
    ln -sfn "pkgs/nvidia/cu13/$entry" "$DIR/$entry"
  done
}

missing=0
for r in "${REQUIREMENTS[@]}"; do installed "$r" || missing=1; done
if [ "$missing" = 1 ]; then
  rm -f "$STAMP"
  install_wheels
  lay_out
  for r in "${REQUIREMENTS[@]}"; do pins_hash "$r"; done >"$STAMP"
fi
log "$("$DIR/bin/nvcc" --version | grep release) at $DIR"

cat <<EOF
export CUDA_ROOT="$DIR"
export CUDA_PATH="$DIR"
export CUDA_HOME="$DIR"
export NVCC="$DIR/bin/nvcc"
export PATH="$DIR/bin:\${PATH}"
export LD_LIBRARY_PATH="$DIR/lib64\${LD_LIBRARY_PATH:+:\${LD_LIBRARY_PATH}}"
EOF
