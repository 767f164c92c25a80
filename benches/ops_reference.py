"""PyTorch's time for the shapes of `cargo bench --bench ops`, for a side-by-side run.

usage: python benches/ops_reference.py [RUNS] [THREADS]   (defaults 15, 2)
Median wall time of RUNS calls after two warm-up calls, f32, inference mode. Attention is the
official SlotDiffusion formulation (einsum, softmax, einsum), and also the scores + softmax
part alone (what DESIGN.md section 4 quotes)."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 15
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)


def median_time(f):
    for _ in range(2):
        f()
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row(op, seconds, flop=None):
    rate = f"{flop / seconds / 1e9:.1f} GFLOP/s ({seconds * 1e3:.2f} ms)" if flop else f"{seconds * 1e3:.3f} ms"
    print(f"| {op} | {rate} |")


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {RUNS} runs\n")
print("| op | PyTorch |\n|---|---|")
with torch.inference_mode():
    for ch, size, batch in [(256, 16, 1), (256, 16, 4), (128, 56, 1), (128, 56, 4)]:
        x = torch.randn(batch, ch, size, size)
        w = torch.randn(ch, ch, 3, 3) * 0.02
        b = torch.randn(ch)
        flop = 2 * batch * ch * ch * 9 * size * size
        row(f"conv 3×3, {ch} ch, {size}², batch {batch}", median_time(lambda: F.conv2d(x, w, b, padding=1)), flop)

    x, w, b = torch.randn(1, 3136, 128), torch.randn(1024, 128) * 0.05, torch.randn(1024)
    row("linear 128→1024 over 3136 tokens (matmul 3136×128×1024)", median_time(lambda: F.linear(x, w, b)), 2 * 3136 * 128 * 1024)

    heads, n, d = 4, 784, 32
    q, k, v = (torch.randn(heads, n, d) for _ in range(3))
    scale = d ** -0.5

    def attention():
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * scale
        return torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)

    def scores():
        return (torch.einsum("b i d, b j d -> b i j", q, k) * scale).softmax(dim=-1)

    row("attention q·kᵀ, softmax, ·v: 4×784², head dim 32 (4·N²·d FLOP)", median_time(attention), 4 * heads * n * n * d)
    row("attention scores + softmax: 4×784², head dim 32 (2·N²·d FLOP)", median_time(scores), 2 * heads * n * n * d)

    x = torch.randn(4, 256, 32, 32)
    norm = torch.nn.GroupNorm(32, 256, eps=1e-5)
    row("GroupNorm(32) on 4×256×32²", median_time(lambda: norm(x)))
    row("GroupNorm(32) + SiLU on 4×256×32²", median_time(lambda: F.silu(norm(x))))
