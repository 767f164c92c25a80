#!/usr/bin/env bash
# Builds slotserve for NVIDIA GPUs with the CUDA 13.0 toolkit of scripts/cuda-toolkit.sh
# (installed on first use), on any x86-64 Linux machine: no GPU and no system CUDA needed.
#
#   scripts/build-cuda.sh [--cuda | --cudnn] [-- CARGO_ARGS...]
#
# Builds `cargo build --release --locked --features cuda` (`cudnn` with --cudnn: convolutions
# through cuDNN 9) into target/cuda (target/cudnn), apart from the CPU build, so neither
# invalidates the other; the binary is target/cuda/release/slotserve. CARGO_ARGS are added
# to the cargo command, e.g. `-- --test parity_decoder` to build that test binary too.
# CUDA_COMPUTE_CAP picks the GPU generation the kernels are compiled for: 90 (H100/H200,
# the default), 89 (L4, L40, RTX 40xx), 86 (A10, RTX 30xx), 80 (A100).
# The toolkit's folder is CUDA_TOOLKIT_DIR, by default .cuda-toolkit in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

FEATURES=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) FEATURES=cuda; shift ;;
    --cudnn) FEATURES=cudnn; shift ;;
    --) shift; break ;;
    *) echo "usage: $0 [--cuda | --cudnn] [-- CARGO_ARGS...]" >&2; exit 2 ;;
  esac
done

toolkit_args=("${CUDA_TOOLKIT_DIR:-.cuda-toolkit}")
[ "$FEATURES" = cudnn ] && toolkit_args+=(--cudnn)
# shellcheck source=scripts/cuda-toolkit.sh
. scripts/cuda-toolkit.sh "${toolkit_args[@]}"

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
echo "build-cuda: features $FEATURES, compute capability $CUDA_COMPUTE_CAP" >&2
cargo build --release --locked --features "$FEATURES" --target-dir "target/$FEATURES" "$@"
