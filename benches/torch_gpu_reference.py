"""PyTorch beside `slotserve bench` on one GPU: the voc preset's networks at full size with
random weights, timed in the same terms (decompose, one batched UNet evaluation, a 20-evaluation
render with VQ decode) at the same batch sizes, so that the ratio is measured on one machine.

usage: python3 benches/torch_gpu_reference.py [--device cuda] [--dtype f32|bf16|f16]
           [--batches 1,8,32,64] [--repeats 3] [--attention einsum|sdpa] [--check]
Prints one JSON line per dtype and batch size (seconds: medians of `--repeats` after a warm-up;
the render: one run after a warm-up) with the peak memory PyTorch allocated. Needs only torch (the official code is not imported).

The networks are written here in plain torch with the official voc configuration's shapes
(sa_ldm_dino_voc_params-res224): DINO ViT-S/8 at 224², soft position embedding and output MLP,
Slot Attention (6 slots of 192, 3 iterations), the LDM UNet (128 channels, mult 1,2,3,4,
2 res blocks, a transformer at levels 2-4, 32 channels a head, context 192) on the 3×56×56
latent, and the VQ-VAE decoder (64 channels, mult 1,2,4) with its 4096-entry codebook.
Each part has exactly the official model's parameter count (the official code built at full
size; checked before anything is timed, and alone with `--check`), and the same FLOPs per call
at batch 1 (torch's FlopCounterMode on both): UNet 66.88 GFLOP, VQ-VAE decode 132.03 GFLOP,
decompose 45.13 GFLOP (the official ViT's pooler adds 0.3 MFLOP, unused by SlotDiffusion).

Attention is computed as the official code does: fused (`scaled_dot_product_attention`, the
Hugging Face ViT's default) in the ViT, `einsum`, softmax, `einsum` in the UNet and VQ-VAE;
`--attention sdpa` fuses those too, to show what a tuned PyTorch deployment gets.
In f32, TF32 is switched off (as slotserve's f32 does not use it). The render is 20 UNet
evaluations, each followed by the x0 prediction snapped to the codebook and a deterministic
update (the work of the official DPM-Solver++ per evaluation; its coefficients differ, its cost
does not), then one VQ-VAE decode.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

# Parameter counts of the official voc model's parts at full size (the official code, built by
# shared/reference/make_reference.py's `build("voc-full")`, counted with named_parameters).
OFFICIAL_PARAMS = {
    "encoder": 21818112,
    "encoder_pos_embedding": 1920,
    "encoder_out_layer": 111744,
    "slot_attention": 482112 + 1152,  # + init_latents
    "unet": 134243331,
    "vq_decoder": 8251523 + 12 + 12288,  # + post_quant_conv + codebook
}

RES, PATCH, VIT_DIM, VIT_LAYERS, VIT_HEADS, VIT_MLP = 224, 8, 384, 12, 6, 1536
SLOTS, SLOT_DIM, SLOT_ITERS = 6, 192, 3
LATENT_C, LATENT_HW = 3, 56
UNET_CH, UNET_MULT, UNET_RES_BLOCKS, UNET_ATTN_LEVELS, HEAD_CH = 128, (1, 2, 3, 4), 2, (1, 2, 3), 32
VQ_CH, VQ_MULT, VQ_RES_BLOCKS, N_EMBED = 64, (1, 2, 4), 2, 4096
STEPS, TIMESTEPS = 20, 1000

ATTENTION = "einsum"


def attention(q, k, v, heads, fused=False):
    """Multi-head attention of q [B, N, C] over k, v [B, M, C]: fused when asked or with
    `--attention sdpa`, else einsum, softmax, einsum."""
    b, n, c = q.shape
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    if fused or ATTENTION == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * (c // heads) ** -0.5
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
    return out.transpose(1, 2).reshape(b, n, c)


def norm(c, eps=1e-6):
    return nn.GroupNorm(32, c, eps=eps)


# ---- encoder: DINO ViT-S/8, position embedding, output MLP, Slot Attention ----


class VitBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(VIT_DIM, eps=1e-12), nn.LayerNorm(VIT_DIM, eps=1e-12)
        self.qkv, self.proj = nn.Linear(VIT_DIM, 3 * VIT_DIM), nn.Linear(VIT_DIM, VIT_DIM)
        self.mlp = nn.Sequential(nn.Linear(VIT_DIM, VIT_MLP), nn.GELU(), nn.Linear(VIT_MLP, VIT_DIM))

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(attention(q, k, v, VIT_HEADS, fused=True))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """DINO ViT-S/8 (with the unused pooler the official Hugging Face model carries)."""

    def __init__(self):
        super().__init__()
        grid = RES // PATCH
        self.patch = nn.Conv2d(3, VIT_DIM, PATCH, stride=PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, VIT_DIM) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, grid * grid + 1, VIT_DIM) * 0.02)
        self.blocks = nn.ModuleList(VitBlock() for _ in range(VIT_LAYERS))
        self.norm = nn.LayerNorm(VIT_DIM, eps=1e-12)
        self.pooler = nn.Linear(VIT_DIM, VIT_DIM)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


class SlotAttention(nn.Module):
    def __init__(self):
        super().__init__()
        d = SLOT_DIM
        self.init_latents = nn.Parameter(torch.randn(1, SLOTS, d))
        self.norm_inputs = nn.LayerNorm(d)
        self.project_q = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d, bias=False))
        self.project_k, self.project_v = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.gru = nn.GRUCell(d, d)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, inputs):
        b = inputs.shape[0]
        inputs = self.norm_inputs(inputs)
        k, v = self.project_k(inputs), self.project_v(inputs)
        slots = self.init_latents.expand(b, -1, -1)
        for _ in range(SLOT_ITERS):
            q = self.project_q(slots)
            attn = (torch.einsum("bkd,bnd->bkn", q, k) * SLOT_DIM**-0.5).softmax(dim=1)
            weights = attn / (attn.sum(dim=-1, keepdim=True) + 1e-8)
            updates = torch.einsum("bkn,bnd->bkd", weights, v)
            slots = self.gru(updates.reshape(-1, SLOT_DIM), slots.reshape(-1, SLOT_DIM))
            slots = slots.reshape(b, SLOTS, SLOT_DIM)
            slots = slots + self.mlp(slots)
        return slots, attn


class Decomposer(nn.Module):
    """Image → slots, soft masks at image size and the segmentation, as `decompose` returns."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.pos_embedding = nn.Linear(4, VIT_DIM)
        self.out_layer = nn.Sequential(
            nn.LayerNorm(VIT_DIM), nn.Linear(VIT_DIM, SLOT_DIM), nn.ReLU(), nn.Linear(SLOT_DIM, SLOT_DIM)
        )
        self.slot_attention = SlotAttention()
        grid = RES // PATCH
        ys, xs = torch.meshgrid(torch.linspace(0, 1, grid), torch.linspace(0, 1, grid), indexing="ij")
        self.register_buffer("grid", torch.stack([ys, xs, 1 - ys, 1 - xs], -1).reshape(1, -1, 4))

    def forward(self, images):
        feats = self.encoder(images) + self.pos_embedding(self.grid.to(images.dtype))
        slots, attn = self.slot_attention(self.out_layer(feats))
        grid = RES // PATCH
        masks = F.interpolate(attn.reshape(-1, SLOTS, grid, grid).float(), size=(RES, RES), mode="bilinear")
        return slots, masks, masks.argmax(dim=1)


# ---- the LDM UNet ----


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(norm(c_in, 1e-5), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(norm(c_out, 1e-5), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k, self.to_v = nn.Linear(context_dim, dim, bias=False), nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context):
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), x.shape[-1] // HEAD_CH))


class TransformerBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1, self.attn2 = Attention(dim, dim), Attention(dim, SLOT_DIM)
        self.ff_proj, self.ff_out = nn.Linear(dim, 8 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x, context):
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        a, gate = self.ff_proj(self.norm3(x)).chunk(2, dim=-1)
        return x + self.ff_out(a * F.gelu(gate))


class SpatialTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.proj_in, self.proj_out = norm(c), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.block = TransformerBlock(c)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        y = self.block(y, context).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Step(nn.Module):
    """One entry of the UNet's block lists: a res block with its transformer, or a resampler."""

    def __init__(self, res=None, transformer=None, resample=None):
        super().__init__()
        self.res, self.transformer, self.resample = res, transformer, resample

    def forward(self, x, emb, context):
        if self.res is not None:
            x = self.res(x, emb)
        if self.transformer is not None:
            x = self.transformer(x, context)
        if self.resample == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


def resampler(kind, c):
    step = Step(resample=kind)
    step.conv = nn.Conv2d(c, c, 3, stride=2 if kind == "down" else 1, padding=1)
    return step


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        emb = 4 * UNET_CH
        self.time_embed = nn.Sequential(nn.Linear(UNET_CH, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(LATENT_C, UNET_CH, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [UNET_CH], UNET_CH
        for level, mult in enumerate(UNET_MULT):
            for _ in range(UNET_RES_BLOCKS):
                attn = SpatialTransformer(mult * UNET_CH) if level in UNET_ATTN_LEVELS else None
                self.down.append(Step(ResBlock(ch, mult * UNET_CH, emb), attn))
                ch = mult * UNET_CH
                skips.append(ch)
            if level < len(UNET_MULT) - 1:
                self.down.append(resampler("down", ch))
                skips.append(ch)
        self.middle = nn.ModuleList(
            [Step(ResBlock(ch, ch, emb), SpatialTransformer(ch)), Step(ResBlock(ch, ch, emb))]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(UNET_MULT))):
            for i in range(UNET_RES_BLOCKS + 1):
                attn = SpatialTransformer(mult * UNET_CH) if level in UNET_ATTN_LEVELS else None
                self.up.append(Step(ResBlock(ch + skips.pop(), mult * UNET_CH, emb), attn))
                ch = mult * UNET_CH
                if level > 0 and i == UNET_RES_BLOCKS:
                    self.up.append(resampler("up", ch))
        self.out = nn.Sequential(norm(ch, 1e-5), nn.SiLU(), nn.Conv2d(ch, LATENT_C, 3, padding=1))

    def forward(self, x, t, context):
        half = UNET_CH // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], -1).to(x.dtype))
        h, skips = self.conv_in(x), []
        skips.append(h)
        for step in self.down:
            h = step(h, emb, context)
            skips.append(h)
        for step in self.middle:
            h = step(h, emb, context)
        for step in self.up:
            if step.res is not None:
                h = torch.cat([h, skips.pop()], 1)
            h = step(h, emb, context)
        return self.out(h)


# ---- the VQ-VAE decoder ----


class VqResBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(
            norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


class VqAttention(nn.Module):
    """Single-head attention over all positions (the VQ-VAE's middle block)."""

    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = attention(q, k, v, 1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class VqDecoder(nn.Module):
    """Codebook snapping, post-quant conv and the decoder: `decode` of the latent VQ-VAE."""

    def __init__(self):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(N_EMBED, LATENT_C))
        self.post_quant_conv = nn.Conv2d(LATENT_C, LATENT_C, 1)
        ch = VQ_CH * VQ_MULT[-1]
        layers = [nn.Conv2d(LATENT_C, ch, 3, padding=1), VqResBlock(ch, ch), VqAttention(ch), VqResBlock(ch, ch)]
        for level, mult in reversed(list(enumerate(VQ_MULT))):
            for _ in range(VQ_RES_BLOCKS + 1):
                layers.append(VqResBlock(ch, VQ_CH * mult))
                ch = VQ_CH * mult
            if level > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [norm(ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*layers)

    def quantize(self, z):
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
        book = self.codebook.float()
        dist = (flat**2).sum(1, keepdim=True) - 2 * flat @ book.t() + (book**2).sum(1)[None]
        q = book[dist.argmin(1)].to(z.dtype)
        return q.reshape(b, h, w, c).permute(0, 3, 1, 2)

    def forward(self, z):
        return self.decoder(self.post_quant_conv(self.quantize(z)))


# ---- the render loop and the timing ----


def render(unet, vq, slots):
    """20 UNet evaluations from noise, each x0 snapped to the codebook, then the VQ decode."""
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, TIMESTEPS, dtype=torch.float64) ** 2
    alphas_bar = torch.cumprod(1 - betas, 0)
    ts = torch.linspace(TIMESTEPS - 1, 0, STEPS + 1).round().long()
    x = torch.randn(slots.shape[0], LATENT_C, LATENT_HW, LATENT_HW, device=slots.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        ab, ab_next = alphas_bar[t].item(), alphas_bar[t_next].item()
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        eps = unet(x.to(slots.dtype), tt, slots).float()
        x0 = vq.quantize((x - (1 - ab) ** 0.5 * eps) / ab**0.5)
        x = ab_next**0.5 * x0 + (1 - ab_next) ** 0.5 * eps
    return vq(x.to(slots.dtype))


def timed(device, repeats, fn):
    """Warm-up, then the median of `repeats` synchronised wall-clock runs."""
    fn()
    runs = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device, dtype, b, repeats, decomposer, unet, vq):
    """One batch size: decompose, one UNet evaluation, one render; seconds and peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images = (torch.rand(b, 3, RES, RES, device=device) * 2 - 1).to(dtype)
    decompose_s = timed(device, repeats, lambda: decomposer(images))
    slots = decomposer(images)[0]
    zt = torch.randn(b, LATENT_C, LATENT_HW, LATENT_HW, device=device, dtype=dtype)
    t = torch.full((b,), 500.0, device=device)
    unet_step_s = timed(device, repeats, lambda: unet(zt, t, slots))
    render_s = timed(device, 1, lambda: render(unet, vq, slots))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"preset": "voc", "framework": f"torch {torch.__version__}", "attention": ATTENTION,
            "batch": b, "decompose_s": decompose_s, "unet_step_s": unet_step_s,
            "render_s": render_s, "peak_allocated_mib": peak}


def param_counts(decomposer, unet, vq):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "encoder": count(decomposer.encoder),
        "encoder_pos_embedding": count(decomposer.pos_embedding),
        "encoder_out_layer": count(decomposer.out_layer),
        "slot_attention": count(decomposer.slot_attention),
        "unet": count(unet),
        "vq_decoder": count(vq),
    }


def main():
    global ATTENTION
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="f32,bf16", help="comma-separated: f32, bf16, f16")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", choices=["einsum", "sdpa"], default="einsum")
    ap.add_argument("--check", action="store_true", help="only compare parameter counts with the official model")
    args = ap.parse_args()
    ATTENTION = args.attention
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    device = torch.device(args.device)
    parts = Decomposer(), UNet(), VqDecoder()
    counts = param_counts(*parts)
    wrong = {k: (v, OFFICIAL_PARAMS[k]) for k, v in counts.items() if v != OFFICIAL_PARAMS[k]}
    if wrong:
        raise SystemExit(f"parameter counts differ from the official model (ours, official): {wrong}")
    if args.check:
        print(json.dumps({"params": counts, "matches_official": True}))
        return
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    for name in args.dtype.split(","):
        dtype = dtypes[name]
        decomposer, unet, vq = (p.to(device, dtype).eval() for p in parts)
        for b in (int(s) for s in args.batches.split(",")):
            with torch.inference_mode():
                print(json.dumps(measure(device, dtype, b, args.repeats, decomposer, unet, vq)
                                 | {"dtype": name}), flush=True)

if __name__ == "__main__":
    main()
