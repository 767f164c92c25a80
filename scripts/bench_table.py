"""Markdown tables of `slotserve bench` beside `scripts/time_pytorch.py`, from their JSON lines.

usage: python scripts/bench_table.py OURS.jsonl PYTORCH.jsonl [PEAK_GFLOPS]
Each file holds one line per preset and round; every figure is the median over the rounds of
the per-run medians. PEAK_GFLOPS (default 234, this CPU's measured f32 peak on 2 threads) turns
UNet and decompose times into a share of the peak, with the FLOP counts PyTorch reports.
"""
import json
import statistics
import sys


def load(path):
    runs = {}
    with open(path) as f:
        for line in f:
            if line.startswith("{"):
                report = json.loads(line)
                runs.setdefault(report["preset"].removesuffix("-full"), []).append(report)
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def timing(reports, stage, batch, field="wall_s"):
    """Median over runs of `stage`'s `field` at `batch`, per image for decompose."""
    def one(report):
        for t in report[stage]:
            if t["batch"] == batch:
                return t[field] / (batch if stage == "decompose" else 1)
        return None
    return median(one(r) for r in reports)


def fmt(value, scale, digits):
    return "–" if value is None else f"{value * scale:.{digits}f}"


def main():
    ours, torch = load(sys.argv[1]), load(sys.argv[2])
    peak = float(sys.argv[3]) if len(sys.argv) > 3 else 234.0
    rows = [
        ("UNet evaluation, batch 1 (ms)", "unet_step", 1, 1e3, 0),
        ("UNet evaluation, batch 4 (ms)", "unet_step", 4, 1e3, 0),
        ("render, batch 1 (s/image)", "render", 1, 1, 2),
        ("decompose, batch 1 (ms/image)", "decompose", 1, 1e3, 0),
        ("decompose, batch 8 (ms/image)", "decompose", 8, 1e3, 0),
    ]
    for field, title in (("wall_s", "wall-clock time"), ("cpu_s", "CPU time, all threads")):
        print(f"\n{title}\n")
        print("| preset | measure | slotserve | PyTorch | slotserve / PyTorch |")
        print("|---|---|---|---|---|")
        for preset in ours:
            for label, stage, batch, scale, digits in rows:
                a = timing(ours[preset], stage, batch, field)
                b = timing(torch.get(preset, []), stage, batch, field)
                ratio = f"{a / b:.2f}" if a and b else "–"
                print(f"| {preset} | {label} | {fmt(a, scale, digits)} | {fmt(b, scale, digits)} | {ratio} |")
    print(f"\nshare of the f32 peak ({peak:.0f} GFLOP/s), from wall-clock time\n")
    print("| preset | measure | GFLOP | slotserve | PyTorch |")
    print("|---|---|---|---|---|")
    for preset in ours:
        flop = {k: median(r.get(k) for r in torch.get(preset, [])) for k in ("unet_gflop", "decompose_gflop")}
        for label, stage, batch, key in (("UNet evaluation, batch 1", "unet_step", 1, "unet_gflop"),
                                         ("UNet evaluation, batch 4", "unet_step", 4, "unet_gflop"),
                                         ("decompose, batch 1", "decompose", 1, "decompose_gflop"),
                                         ("decompose, batch 8", "decompose", 8, "decompose_gflop")):
            gflop = flop[key] and flop[key] * (batch if stage == "unet_step" else 1)
            share = [timing(src.get(preset, []), stage, batch) for src in (ours, torch)]
            cells = [fmt(gflop / t / peak if gflop and t else None, 100, 0) + " %" for t in share]
            print(f"| {preset} | {label} | {fmt(gflop, 1, 1)} | {cells[0]} | {cells[1]} |")
    print("\npeak resident memory of the whole run (MiB)\n")
    print("| preset | slotserve | PyTorch |")
    print("|---|---|---|")
    for preset in ours:
        mem = [median(r.get("peak_rss_mib") for r in src.get(preset, [])) for src in (ours, torch)]
        print(f"| {preset} | {fmt(mem[0], 1, 0)} | {fmt(mem[1], 1, 0)} |")


main()
