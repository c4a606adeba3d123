"""Benchmark: UNet-call time of the SD architecture with and without acceleration.

    python bench.py --dtype bf16 --vs-diffusers                    # baseline vs diffusers' UNet
    python bench.py --methods baseline,tome:0.5,sito:0.5 --attention sdpa,math
    python bench.py --selection                                     # token-selection cost per block

Weights are random (speed does not depend on their values) unless --ckpt is given. Every time
is a median over --runs timed calls after --warmup untimed ones; the methods' calls alternate
run by run, so all of them see the same machine load. Speed-ups are against our baseline with
the same attention backend, measured in the same run.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from model import PRESETS, load_checkpoint
from model.unet import UNetModel
from prune import TokenPruning, dato, sito, tome
from sampler import Acceleration

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def diffusers_unet(config, dtype, device, attention):
    """diffusers' UNet2DConditionModel with the same architecture (random weights)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    u = config.unet
    heads = u.num_heads if not u.head_channels else [u.model_channels * m // u.head_channels for m in u.channel_mult]
    unet = UNet2DConditionModel(block_out_channels=[u.model_channels * m for m in u.channel_mult],
                                cross_attention_dim=u.context_dim, attention_head_dim=heads,
                                use_linear_projection=u.linear_proj, layers_per_block=u.num_res_blocks)
    if attention == "math":
        unet.set_attn_processor(AttnProcessor())
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def parse_method(spec):
    """"baseline" | "tome:0.5" | "sito:0.5" | "dato:0.5" -> Acceleration or None."""
    if spec == "baseline":
        return None
    name, _, ratio = spec.partition(":")
    return Acceleration(TokenPruning(name, ratio=float(ratio or 0.5)))


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(calls, runs, warmup, device):
    """{name: fn} -> {name: [seconds per run]}, the calls interleaved run by run."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            times[name].append(timed(fn, device))
    return times


def unet_call(unet, accel, x, t, context):
    """One UNet call as the sampler makes it: a fresh per-run state that has already seen two
    outputs (so DaTo computes its dynamics map, as in every call after the first two)."""
    if accel is None:
        return lambda: unet(x, t, context)
    previous = [torch.randn_like(x), torch.randn_like(x)]

    def call():
        run = accel.start(calls=1, seed=0)
        for out in previous:
            run.end_call(out)
        run.begin_call(0, x)
        return unet(x, t, context, accel=run)
    return call


# ---------------------------------------------------------------------------------------------
# token selection alone

def official_selection(x, hw, ratio, noise_alpha=0.1, generator=None):
    """What the official SiTo/DaTo code does per block (SiTo's prune_and_recover_tokens), for
    comparison: the full N x N cosine matrix, its row sums, and the candidate x base and kept x
    pruned similarities gathered out of it."""
    b, n, _ = x.shape
    (h, w), k = hw, int(n * ratio)
    m = F.normalize(x, dim=-1)
    gram = m @ m.transpose(1, 2)                                                   # [B, N, N]
    score = gram.sum(-1) + noise_alpha * torch.randn(b, n, generator=generator).to(x)
    choice = score.view(b, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(b, h // 2, w // 2, 4).argmax(-1)
    base = ((torch.arange(h // 2)[:, None] * 2 + choice // 2) * w + torch.arange(w // 2)[None] * 2 + choice % 2)
    order = torch.zeros(b, n, dtype=torch.long).scatter_(1, base.reshape(b, -1), -1).argsort(1)
    b_idx, a_idx = order[:, :base[0].numel()], order[:, base[0].numel():]
    ab = gram.gather(1, a_idx[..., None].expand(-1, -1, n)).gather(2, b_idx[:, None].expand(-1, a_idx.shape[1], -1))
    edges = ab.max(-1).values.argsort(-1, descending=True)
    pruned, kept = a_idx.gather(1, edges[:, :k]), torch.cat([a_idx.gather(1, edges[:, k:]), b_idx], 1)
    kp = gram.gather(1, kept[..., None].expand(-1, -1, n)).gather(2, pruned[:, None].expand(-1, kept.shape[1], -1))
    return kept, pruned, kp.argmax(1)


def selection_bench(args, device, dtype):
    """Per-block selection cost at the top level of the UNet (N = latent tokens, C = 320)."""
    h, w = args.H // 8, args.W // 8
    x = torch.randn(2 * args.batch, h * w, 320, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    dynamics = torch.rand(x.shape[0], h, w, device=device)
    rows = {}
    for ratio in (0.3, 0.5, 0.7):
        calls = {"official (N x N Gram)": lambda: official_selection(x, (h, w), ratio, generator=g),
                 "sito (kept)": lambda: sito.plan(x, (h, w), ratio, generator=g),
                 "sito (base)": lambda: sito.plan(x, (h, w), ratio, recover_from="base", generator=g),
                 "dato (kept)": lambda: dato.plan(x, (h, w), ratio, dynamics=dynamics, generator=g),
                 "tome": lambda: tome.plan(x, (h, w), ratio, generator=g)}
        times = compare(calls, args.runs, args.warmup, device)
        rows[ratio] = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\nToken selection per block: N={h * w}, C=320, batch {x.shape[0]}, {args.dtype}, {device.type}; "
          f"median ms (ratio to the official approach)")
    names = list(next(iter(rows.values())))
    print(f"{'ratio':>6} " + " ".join(f"{n:>22}" for n in names))
    for ratio, r in rows.items():
        base = r[names[0]]
        print(f"{ratio:6.1f} " + " ".join(f"{r[n] * 1e3:13.1f} ({r[n] / base:5.2f}x)" for n in names))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd1", "sd2", "tiny"], default="sd1", help="architecture (random weights)")
    p.add_argument("--ckpt", help="time a real checkpoint instead of random weights")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="bf16 is ~2x faster than fp32 on AMX CPUs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", default="sdpa", help="comma-separated backends: sdpa, math")
    p.add_argument("--methods", default="baseline", help="comma-separated: baseline, tome:R, sito:R, dato:R")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images per call; CFG doubles it")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vs-diffusers", action="store_true", help="also time diffusers' UNet2DConditionModel")
    p.add_argument("--selection", action="store_true", help="time token selection alone (no UNet)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    results = {"args": vars(args)}
    if args.selection:
        with torch.inference_mode():
            results["selection"] = selection_bench(args, device, dtype)
    else:
        torch.manual_seed(0)
        if args.ckpt:
            sd = load_checkpoint(args.ckpt, device=device, dtype=dtype)
            config, unet = sd.config, sd.unet
        else:
            config = PRESETS[args.model]
            unet = UNetModel(config.unet).to(device=device, dtype=dtype).channels_last().eval().requires_grad_(False)
        b = 2 * args.batch
        x = torch.randn(b, 4, args.H // 8, args.W // 8, device=device, dtype=dtype)
        t = torch.full((b,), 500, device=device)
        context = torch.randn(b, 77, config.unet.context_dim, device=device, dtype=dtype)
        results["calls"] = {}
        for attention in args.attention.split(","):
            unet.set_attention(attention)
            calls = {spec: unet_call(unet, parse_method(spec), x, t, context) for spec in args.methods.split(",")}
            if args.vs_diffusers:
                theirs = diffusers_unet(config, dtype, device, attention)
                calls["diffusers"] = lambda: theirs(x, t, context)
            with torch.inference_mode():
                times = compare(calls, args.runs, args.warmup, device)
            base = statistics.median(times["baseline"]) if "baseline" in times else None
            print(f"\nUNet call, {args.ckpt or args.model}, {args.H}x{args.W}, batch {b} (CFG), {args.dtype}, "
                  f"{attention} attention, {device.type}, median of {args.runs} runs")
            print(f"{'method':14} {'ms/call':>9} {'min-max':>15} {'speed-up':>9}")
            for name, ts in times.items():
                med = statistics.median(ts)
                speedup = f"{base / med:8.2f}x" if base else ""
                print(f"{name:14} {med * 1e3:9.0f} {min(ts) * 1e3:7.0f}-{max(ts) * 1e3:<7.0f} {speedup}")
            results["calls"][attention] = times
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
