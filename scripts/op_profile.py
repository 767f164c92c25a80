"""Where a `perf record` of slotserve spent its CPU time, grouped by kind of operation.

usage: python3 scripts/op_profile.py PERF_DATA [PERF_DATA ...]
e.g.   perf record -F 999 -o unet.data target/release/slotserve bench --presets clevrtex \
           --decompose-batches --unet-batches 4 --repeats 20 --render-batches
       python3 scripts/op_profile.py unet.data

Reads `perf report --no-children --sort symbol` of each file and sums the sample shares of
the symbols into the groups below (first matching pattern wins), one column per file. The
samples cover the whole process, model construction included: time enough repetitions that
it is small (its share shows as "random weights and packing").
"""
import re
import subprocess
import sys

GROUPS = [
    ("matrix micro-kernel (ops)", r"slotserve::ops::x86::tile\b"),
    ("matrix kernel (candle's gemm)", r"gemm_f32|gemm_common|gemm::"),
    ("convolution padding, gathering, scatter (ops)", r"ops::x86::conv::"),
    ("linear packing (ops)", r"ops::x86::linear::"),
    ("attention softmax and packing (ops)", r"ops::x86::attention::"),
    ("GroupNorm / LayerNorm (ops)", r"ops::x86::(norm|layer_norm)::"),
    ("GELU (ops)", r"ops::x86::activation::"),
    ("candle elementwise, copies, reductions", r"candle_core::cpu_backend|candle_core::cpu::|memmove|memset|memcpy"),
    ("scalar exp / erf (candle softmax, GELU)", r"expf|erff|erfc|libm::"),
    ("thread pools: spinning, waking, waiting",
     r"BarrierGuard|BarrierPool|call_trampoline|rayon|crossbeam|__rust_begin_short_backtrace|"
     r"finish_task_switch|schedule|futex|sched_yield|do_syscall"),
    ("random weights and packing (benchmark set-up)", r"rand_chacha|rand_distr|rand::|from_candle|::pack\b"),
    ("kernel: page faults, zeroing, unmapping", r"^\[k\]"),
]
OTHER = "other (closures and iterators inlined from several ops)"


def shares(path):
    report = subprocess.run(
        ["perf", "report", "-i", path, "--stdio", "--no-children", "--sort", "symbol"],
        check=True, capture_output=True, text=True).stdout
    totals = {name: 0.0 for name, _ in GROUPS} | {OTHER: 0.0}
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\[.\])\s+(.*)", line)
        if not match:
            continue
        share, kind, symbol = float(match[1]), match[2], match[3].strip()
        name = next((n for n, p in GROUPS if re.search(p, f"{kind} {symbol}")), OTHER)
        totals[name] += share
    return totals


def main():
    columns = [shares(p) for p in sys.argv[1:]]
    print("| operation | " + " | ".join(sys.argv[1:]) + " |")
    print("|---|" + "---|" * len(columns))
    for name in [n for n, _ in GROUPS] + [OTHER]:
        print(f"| {name} | " + " | ".join(f"{c[name]:.1f} %" for c in columns) + " |")


main()
