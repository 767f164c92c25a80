"""The tables of a `scripts/gpu-proof.sh run`, in Markdown for docs/performance.md.

usage: python3 scripts/gpu_proof_summary.py RESULTS_DIR      (prints to stdout)

Reads what the run wrote there: machine.txt (nvidia-smi), parity.log (the parity tests'
output), bench.jsonl (`slotserve bench`, one line per build, dtype and batch), torch.jsonl
(benches/torch_gpu_reference.py), memory.tsv (peak GPU memory per process) and, when the
server step ran, server.json.
"""
import csv
import json
import os
import sys


def read_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


def read_json_lines(path):
    rows = []
    for line in read_lines(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut off by a step's time limit
    return rows


def gpu_name(results):
    lines = read_lines(os.path.join(results, "machine.txt"))
    for i, line in enumerate(lines):
        if line.startswith("name, driver_version") and i + 1 < len(lines):
            return lines[i + 1]
    return "unknown GPU"


def parity_section(results):
    lines = read_lines(os.path.join(results, "parity.log"))
    keep = [l for l in lines if "max abs diff" in l or "test result" in l or "exit status" in l
            or l.startswith("test ") or "skipped" in l or "panicked" in l]
    return ["## Parity on CUDA (voc-small, tests/parity_decoder.rs)", "", "```", *keep, "```", ""]


def per_batch(report, key):
    """Wall seconds per batch size of one stage of a `slotserve bench` report."""
    return {t["batch"]: t["wall_s"] for t in report.get(key, [])}


def throughput_section(results):
    memory = {row[0]: row[1] for row in csv.reader(
        read_lines(os.path.join(results, "memory.tsv")), delimiter="\t") if len(row) == 2}
    rows = []
    for r in read_json_lines(os.path.join(results, "bench.jsonl")):
        dec, unet, ren = (per_batch(r, k) for k in ("decompose", "unet_step", "render"))
        build = r.get("build", "slotserve")
        for b in dec:
            rows.append((r["dtype"], b, f"{build} (candle)", dec[b], unet.get(b), ren.get(b),
                         memory.get(f"{build} {r['dtype']} b{b}", "")))
    for r in read_json_lines(os.path.join(results, "torch.jsonl")):
        peak = r.get("peak_allocated_mib")
        mem = f"{memory.get('torch ' + r['dtype'], '')} (allocated {peak:.0f})" if peak else ""
        rows.append((r["dtype"], r["batch"], f"{r['framework']} ({r['attention']})",
                     r["decompose_s"], r["unet_step_s"], r["render_s"], mem))
    out = ["## voc preset, full size, random weights", "",
           "| dtype | batch | framework | decompose images/s | render images/s | ms per UNet evaluation | peak GPU MiB |",
           "|---|---|---|---|---|---|---|"]
    for dtype, b, fw, dec, unet, ren, mem in sorted(rows, key=lambda r: (r[0], r[1], r[2])):
        fmt = lambda s, scale: f"{scale / s:.1f}" if s else "–"  # noqa: E731
        ms = f"{unet * 1000:.1f}" if unet else "–"
        out.append(f"| {dtype} | {b} | {fw} | {fmt(dec, b)} | {fmt(ren, b)} | {ms} | {mem} |")
    out.append("")
    out.append("Renders: 20 UNet evaluations (DPM-Solver++ in slotserve) with codebook snapping, then "
               "the VQ-VAE decode. Peak GPU MiB: nvidia-smi's memory.used, sampled every 100 ms, "
               "per slotserve process (one per batch) and per PyTorch process (all batches).")
    return out + [""]


def server_section(results):
    path = os.path.join(results, "server.json")
    if not os.path.exists(path):
        return []
    return ["## Server under concurrent render clients (bf16)", "", "```json",
            *read_lines(path), "```", ""]


def main():
    results = sys.argv[1]
    print(f"# GPU proof: {gpu_name(results)}\n")
    for line in parity_section(results) + throughput_section(results) + server_section(results):
        print(line)


if __name__ == "__main__":
    main()
