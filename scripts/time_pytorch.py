"""Time the official SlotDiffusion code on this CPU in the terms of `slotserve bench`.

usage: python scripts/time_pytorch.py NAME [THREADS] [REPEATS] [DECOMPOSE_BATCHES] [UNET_BATCHES] [RENDER]
  NAME: a full-size variant of the reference scripts (clevrtex-full, voc-full)
  THREADS (2), REPEATS (3), DECOMPOSE_BATCHES ("1,8"), UNET_BATCHES ("1,4"), RENDER (1 or 0)

The official model is built, with random weights, by `make_reference.build` from the reference
scripts ($REFERENCE_DIR, default ../shared/reference beside this checkout; they import the
official code from $SLOTDIFFUSION_SRC). Each measurement is one untimed warm-up call, then the
median of REPEATS calls, in wall and process CPU seconds, as `slotserve bench` measures: decompose
(`model.encode`), one UNet evaluation at timestep 500, and one render at batch 1 (20 DPM-Solver++
evaluations and the VQ-VAE decode). Prints one JSON line shaped like `slotserve bench`'s, plus
the FLOP of one image's decompose and of one UNet evaluation (PyTorch's FLOP counter).
"""
import json
import os
import resource
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_DIR = os.environ.get("REFERENCE_DIR", os.path.join(HERE, "..", "..", "shared", "reference"))
sys.path.insert(0, REFERENCE_DIR)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import make_reference  # noqa: E402


def batches(arg):
    return [int(b) for b in arg.split(",") if b]


name = sys.argv[1]
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
decompose_batches = batches(sys.argv[4]) if len(sys.argv) > 4 else [1, 8]
unet_batches = batches(sys.argv[5]) if len(sys.argv) > 5 else [1, 4]
render = (sys.argv[6] != "0") if len(sys.argv) > 6 else True
torch.set_num_threads(threads)


def run_timed(f):
    t0, c0 = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - t0, time.process_time() - c0


def timing(batch, f, runs):
    """One warm-up call, then the medians of `runs` timed calls."""
    f()
    times = [run_timed(f) for _ in range(max(runs, 1))]
    return {"batch": batch, "wall_s": statistics.median(t[0] for t in times),
            "cpu_s": statistics.median(t[1] for t in times)}


model, params = make_reference.build(name)
side = params.resolution[0]
report = {"preset": name, "resolution": side, "threads": torch.get_num_threads(),
          "torch": torch.__version__, "decompose": [], "unet_step": [], "render": []}
with torch.inference_mode():
    for b in decompose_batches:
        images = torch.rand(b, 3, side, side) * 2 - 1
        report["decompose"].append(timing(b, lambda: model.encode(images), repeats))
    decoder = model.dm_decoder
    unet = decoder.model.diffusion_model
    for b in unet_batches:
        slots, _ = model.encode(torch.rand(b, 3, side, side) * 2 - 1)
        latents = torch.randn(b, decoder.channels, *decoder.resolution)
        t = torch.full((b,), 500.0)
        report["unet_step"].append(timing(b, lambda: unet(latents, t, context=slots), repeats))
    if render:
        slots, _ = model.encode(torch.rand(1, 3, side, side) * 2 - 1)

        def render_one():
            latent = decoder.generate_imgs(cond=slots, batch_size=1, use_dpm=True, ret_intermed=False,
                                           verbose=False)
            decoder.vae.decode(latent)

        wall, cpu = run_timed(render_one)
        report["render"].append({"batch": 1, "wall_s": wall, "cpu_s": cpu})
    # FLOP of one image's decompose and of one UNet evaluation at batch 1, by PyTorch's counter.
    with FlopCounterMode(display=False) as counter:
        model.encode(torch.rand(1, 3, side, side) * 2 - 1)
    report["decompose_gflop"] = counter.get_total_flops() / 1e9
    slots, _ = model.encode(torch.rand(1, 3, side, side) * 2 - 1)
    with FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, decoder.channels, *decoder.resolution), torch.full((1,), 500.0), context=slots)
    report["unet_gflop"] = counter.get_total_flops() / 1e9
report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(report))
