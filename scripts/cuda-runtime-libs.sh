#!/usr/bin/env bash
# Copies the CUDA libraries that a CUDA build of slotserve loads out of the toolkit of
# scripts/cuda-toolkit.sh into one folder, for a runtime image or machine without the toolkit.
#
#   scripts/cuda-runtime-libs.sh BINARY DEST [TOOLKIT_DIR]
#
# What BINARY links from the toolkit (cudart, cuBLAS and cuBLASLt, cuRAND, NVRTC; cuDNN in a
# `cudnn` build), and beside each the companions it opens at run time, named after it
# (libnvrtc-builtins.so.*, libcudnn_*.so.*). Not the driver's libcuda.so.1: that comes with
# the NVIDIA driver. TOOLKIT_DIR defaults to .cuda-toolkit in the repository.
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 BINARY DEST [TOOLKIT_DIR]" >&2; exit 2; }
BIN="$1"
DEST="$2"
LIB="$(cd "${3:-$(dirname "$0")/../.cuda-toolkit}/lib64" && pwd -P)"

mkdir -p "$DEST"
needed="$(LD_LIBRARY_PATH="$LIB" ldd "$BIN" | awk -v lib="$LIB/" 'index($3, lib) == 1 { print $3 }')"
[ -n "$needed" ] || { echo "$BIN links no library of $LIB: is it a CUDA build?" >&2; exit 1; }
for path in $needed; do
  name="${path##*/}"
  base="${name%%.so.*}"
  cp -L "$path" "$DEST/"
  for companion in "$LIB/$base"-*.so.* "$LIB/$base"_*.so.*; do
    [ -e "$companion" ] && cp -L "$companion" "$DEST/"
  done
done
ls "$DEST"
