#!/usr/bin/env bash
# slotserve beside the official PyTorch code on this CPU, back to back, and a table of both.
#
# usage: scripts/bench-vs-pytorch.sh [ROUNDS] [THREADS]          (defaults: 2 rounds, 2 threads)
# environment: PRESETS ("clevrtex voc"), SLOTSERVE (target/release/slotserve; build it first
# with `cargo build --release`), PYTHON (a Python with torch, transformers 4, einops; default
# python3), REFERENCE_DIR (the reference scripts, ../shared/reference) with SLOTDIFFUSION_SRC
# and NERV_SRC as they need them, OUT (where the JSON lines and the load go; a temporary
# directory by default).
#
# Each round runs every preset once with each implementation, alternating which goes first;
# `uptime` is recorded before each run. Timings are only comparable on an otherwise idle
# machine: the table says the load they ran under.
set -euo pipefail

rounds=${1:-2}
threads=${2:-2}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
slotserve=${SLOTSERVE:-$root/target/release/slotserve}
python=${PYTHON:-python3}
presets=${PRESETS:-clevrtex voc}
out=${OUT:-$(mktemp -d)}
export REFERENCE_DIR=${REFERENCE_DIR:-$root/../shared/reference}

ours() {
    RAYON_NUM_THREADS=$threads "$slotserve" bench --presets "$1" >>"$out/ours.jsonl"
}
pytorch() {
    "$python" "$here/time_pytorch.py" "$1-full" "$threads" 2>>"$out/pytorch.log" | grep "^{" >>"$out/pytorch.jsonl"
}

for round in $(seq "$rounds"); do
    for preset in $presets; do
        for side in $( ((round % 2)) && echo "ours pytorch" || echo "pytorch ours"); do
            echo "round $round, $preset, $side: $(uptime)" | tee -a "$out/load.txt" >&2
            "$side" "$preset"
        done
    done
done
echo "round $rounds done: $(uptime)" >>"$out/load.txt"

echo "# slotserve vs PyTorch, $threads threads, $rounds rounds ($(date -u +%FT%TZ))"
echo
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs; load during the runs:"
echo
sed 's/^/    /' "$out/load.txt"
"$python" "$here/bench_table.py" "$out/ours.jsonl" "$out/pytorch.jsonl"
echo
echo "(raw JSON lines in $out)"
