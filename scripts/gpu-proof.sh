#!/usr/bin/env bash
# The CUDA build proven on a GPU in one short run: fixture parity on CUDA, then `slotserve
# bench` beside the same networks in PyTorch, with GPU memory, on one machine.
#
#   scripts/gpu-proof.sh prepare [--cudnn]
#                                   here, no GPU needed: builds the CUDA binaries
#                                   (scripts/build-cuda.sh; with --cudnn also a cuDNN slotserve),
#                                   trims the voc-small fixture to the decoder and packs both
#                                   into .gpu-proof/ (git-ignored, under the 64 MiB that travels
#                                   with a device run: carry .gpu-proof)
#   scripts/gpu-proof.sh run        there, from the repository root: unpacks .gpu-proof/ and
#                                   writes every result under $OUT (or PROOF_OUT)
#
# `run` does, each step under a time limit so the whole stays within PROOF_BUDGET seconds
# (default 480):
#  1. tests/parity_decoder.rs on CUDA (SLOTSERVE_TEST_DEVICE=cuda) against the official
#     voc-small vectors: UNet and VQ-VAE in f32 to 1e-4 (TF32 off), and in f16 and bf16 to
#     the tolerances stated in that test;
#  2. `slotserve bench --presets voc` with random weights, bf16 then f32, batches 1, 8, 32,
#     64, one process per batch with its peak GPU memory (nvidia-smi), for the cuda build and
#     the cudnn one when carried; beside each dtype, benches/torch_gpu_reference.py, the same
#     networks in PyTorch;
#  3. if this slotserve has `bench --server`, the server under 1, 8, 32 and 64 concurrent
#     render clients;
#  4. summary.md: the table for docs/performance.md (scripts/gpu_proof_summary.py).
# The full encoder and end-to-end parity (tests/parity_encoder.rs, parity_pipeline.rs) need
# the whole 58 MB voc-small checkpoint, which cannot travel beside the binaries.
#
# `prepare` needs python3 with torch and safetensors to trim the checkpoint (PYTHON_TORCH,
# default python3) and the fixtures folder (SLOTSERVE_FIXTURES, default
# ../shared/fixtures/official); `run` needs the NVIDIA driver, nvidia-smi and a python3 with
# torch, and finds the CUDA libraries the binaries link (cuBLAS, cuBLASLt, cuRAND; cuDNN for
# slotserve-cudnn) in that python's nvidia packages or in /usr/local/cuda.
set -uo pipefail
cd "$(dirname "$0")/.."

PROOF=.gpu-proof
FIXTURE=voc-small
PARITY_TESTS=(parity_decoder)
BATCHES=(1 8 32 64)
DTYPES=(bf16 f32)
# Per-step limits in seconds, each also cut to what is left of PROOF_BUDGET.
PARITY_LIMIT=90
BENCH_LIMIT=90
TORCH_LIMIT=120
SERVER_LIMIT=90

die() { echo "gpu-proof: $*" >&2; exit 1; }

# ---- prepare (here) ----

# Builds the CUDA slotserve and parity test binaries; prints their paths.
build_binaries() {
  local args=(--bin slotserve) t
  for t in "${PARITY_TESTS[@]}"; do args+=(--test "$t"); done
  scripts/build-cuda.sh -- "${args[@]}" --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])'
}

# Writes the decoder's part of fixture $FIXTURE (UNet and VQ-VAE weights, their vectors).
trim_fixture() {
  local src="${SLOTSERVE_FIXTURES:-../shared/fixtures/official}" dest="$1"
  [ -f "$src/official_$FIXTURE.pth" ] || die "no $src/official_$FIXTURE.pth (set SLOTSERVE_FIXTURES)"
  "${PYTHON_TORCH:-python3}" - "$src" "$dest" "$FIXTURE" <<'EOF' || die "trimming needs python3 with torch and safetensors (PYTHON_TORCH)"
import sys, torch
from safetensors.torch import load_file, save_file
src, dest, name = sys.argv[1:]
sd = torch.load(f"{src}/official_{name}.pth", map_location="cpu")
keep = ("dm_decoder.model.diffusion_model.", "dm_decoder.vae.")
torch.save({k: v for k, v in sd.items() if k.startswith(keep)}, f"{dest}/official_{name}.pth")
vectors = load_file(f"{src}/vectors_{name}.safetensors")
wanted = ["image", "slots", "unet_zt", "unet_t", "unet_eps", "vq_latent", "vq_decoded", "vq_encoded"]
save_file({k: vectors[k] for k in wanted}, f"{dest}/vectors_{name}.safetensors")
EOF
}

prepare() {
  local stage="$PROOF/stage"
  rm -rf "$PROOF" && mkdir -p "$stage/bin" "$stage/fixtures"
  local exes exe
  exes="$(build_binaries)" || die "the CUDA build failed"
  for exe in $exes; do
    local name="${exe##*/}"
    strip -o "$stage/bin/${name%%-*}" "$exe"
  done
  [ -x "$stage/bin/slotserve" ] || die "the CUDA build made no slotserve binary"
  if [ "${1:-}" = --cudnn ]; then
    scripts/build-cuda.sh --cudnn -- --bin slotserve || die "the cuDNN build failed"
    strip -o "$stage/bin/slotserve-cudnn" target/cudnn/release/slotserve
  fi
  trim_fixture "$stage/fixtures"
  ls -l "$stage"/bin "$stage"/fixtures >&2
  tar -C "$stage" -cf - . | xz -T2 -9 > "$PROOF/payload.tar.xz"
  rm -rf "$stage"
  local size
  size=$(stat -c %s "$PROOF/payload.tar.xz")
  echo "gpu-proof: $PROOF/payload.tar.xz is $((size / 1024 / 1024)) MiB" >&2
  [ "$size" -lt $((60 * 1024 * 1024)) ] || die "the payload is over 60 MiB: it would not travel"
}

# ---- run (on the GPU machine) ----

START=$SECONDS
# A step's time limit: its own, cut to what is left of the budget (at least 1 s).
limit() {
  local left=$(( ${PROOF_BUDGET:-480} - (SECONDS - START) ))
  (( left < 1 )) && left=1
  echo $(( left < $1 ? left : $1 ))
}

# Folders holding the CUDA libraries the binaries link, from the GPU machine's python
# packages and CUDA install.
cuda_library_path() {
  python3 - <<'EOF'
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += glob.glob(os.path.join(sp, "nvidia", "*", "lib"))
dirs += glob.glob("/usr/local/cuda/lib64") + glob.glob("/usr/local/cuda/targets/x86_64-linux/lib")
print(":".join(d for d in dirs if os.path.isdir(d)))
EOF
}

# Runs a command while sampling the GPU's used memory; appends "NAME<TAB>peak MiB" to
# $RESULTS/memory.tsv. Returns the command's status.
with_gpu_memory() {
  local name="$1" samples rc sampler
  shift
  samples=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$samples" &
  sampler=$!
  "$@"
  rc=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  printf '%s\t%s\n' "$name" "$(sort -n "$samples" | tail -1)" >> "$RESULTS/memory.tsv"
  rm -f "$samples"
  return $rc
}

step() { echo; echo "=== $* (t = $((SECONDS - START)) s)"; }

run_parity() {
  local t
  for t in "${PARITY_TESTS[@]}"; do
    step "parity: $t on CUDA"
    SLOTSERVE_TEST_DEVICE=cuda SLOTSERVE_FIXTURES="$WORK/fixtures" NVIDIA_TF32_OVERRIDE=0 \
      timeout "$(limit $PARITY_LIMIT)" "$WORK/bin/$t" --test-threads 1 --nocapture \
      2>&1 | tee -a "$RESULTS/parity.log"
    echo "$t exit status ${PIPESTATUS[0]}" | tee -a "$RESULTS/parity.log"
  done
}

run_bench() {
  local dtype b build builds=(slotserve)
  [ -x "$WORK/bin/slotserve-cudnn" ] && builds+=(slotserve-cudnn)
  for dtype in "${DTYPES[@]}"; do
    # f32 without TF32 (cuDNN would use it), as PyTorch's f32 below.
    local strict=()
    [ "$dtype" = f32 ] && strict=(env NVIDIA_TF32_OVERRIDE=0)
    for build in "${builds[@]}"; do
      for b in "${BATCHES[@]}"; do
        step "$build bench: voc, $dtype, batch $b"
        with_gpu_memory "$build $dtype b$b" timeout "$(limit $BENCH_LIMIT)" "${strict[@]}" \
          "$WORK/bin/$build" bench --presets voc --device cuda --dtype "$dtype" \
          --decompose-batches "$b" --unet-batches "$b" --render-batches "$b" --repeats 3 | sed "s/^{/{\"build\":\"$build\",/" \
          | tee -a "$RESULTS/bench.jsonl"
      done
    done
    step "PyTorch: voc, $dtype, batches ${BATCHES[*]}"
    with_gpu_memory "torch $dtype" timeout "$(limit $TORCH_LIMIT)" \
      python3 benches/torch_gpu_reference.py --dtype "$dtype" \
      --batches "$(IFS=,; echo "${BATCHES[*]}")" | tee -a "$RESULTS/torch.jsonl"
  done
}

# The server's continuous batching under concurrent render clients, where this slotserve has
# the load generator (`slotserve bench --server`).
run_server() {
  "$WORK/bin/slotserve" bench --help | grep -q -- '--server' || {
    echo "this slotserve has no 'bench --server': server step skipped" | tee "$RESULTS/server.txt"
    return 0
  }
  step "server: voc bf16, 1, 8, 32 and 64 concurrent render clients"
  local model="$WORK/voc-random" port=3917 server
  "$WORK/bin/slotserve" init --preset voc --out "$model" > /dev/null || return 1
  "$WORK/bin/slotserve" serve --model "$model" --device cuda --dtype bf16 --host 127.0.0.1 \
    --port "$port" --max-batch-size 64 --max-queue 256 --max-concurrent 256 \
    > "$RESULTS/server.txt" 2>&1 &
  server=$!
  local tries=0
  until python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$port/health" 2> /dev/null; do
    sleep 1
    tries=$((tries + 1))
    (( tries < 120 )) || { echo "server not healthy after 120 s" >> "$RESULTS/server.txt"; break; }
  done
  with_gpu_memory "server bf16" timeout "$(limit $SERVER_LIMIT)" \
    "$WORK/bin/slotserve" bench --server "http://127.0.0.1:$port" --endpoints render \
    --clients 1,8,32,64 --requests 128 --json | tee "$RESULTS/server.json"
  kill "$server" 2>/dev/null
  wait "$server" 2>/dev/null
}

run() {
  RESULTS="${PROOF_OUT:-${OUT:?set OUT or PROOF_OUT to the results folder}}"
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  mkdir -p "$RESULTS"
  [ -f "$PROOF/payload.tar.xz" ] || die "no $PROOF/payload.tar.xz: run '$0 prepare' and carry $PROOF"
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    "$PROOF/payload.tar.xz" "$WORK" || die "cannot unpack the payload"
  export LD_LIBRARY_PATH
  LD_LIBRARY_PATH="$(cuda_library_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$WORK"/bin/*
    python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'
  } > "$RESULTS/machine.txt" 2>&1
  if ldd "$WORK"/bin/* | grep -q 'not found'; then
    grep 'not found' "$RESULTS/machine.txt"
    die "a CUDA library is missing (see machine.txt)"
  fi
  run_parity
  run_bench
  run_server
  python3 scripts/gpu_proof_summary.py "$RESULTS" | tee "$RESULTS/summary.md"
  echo "gpu-proof: $((SECONDS - START)) s"
}

case "${1:-}" in
  prepare) prepare "${2:-}" ;;
  run) run ;;
  *) sed -n '2,32p' "$0"; exit 2 ;;
esac
