"""Benchmark: time UNet calls of the SD architecture, ours against diffusers' in the same process.

    python bench.py --dtype bf16 --vs-diffusers          # SD1 UNet, 512x512, CFG batch 2, random weights
    python bench.py --model sd2 --dtype fp32 --runs 7

Weights are random (speed does not depend on their values) unless --ckpt is given. Every
number is a median over --runs timed calls after --warmup untimed ones; when two models are
compared, their calls alternate so both see the same machine load.
"""
import argparse
import json
import statistics
import time

import torch

from model import PRESETS, load_checkpoint
from model.unet import UNetModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def diffusers_unet(config, dtype, device):
    """diffusers' UNet2DConditionModel with the same architecture (random weights)."""
    from diffusers import UNet2DConditionModel
    u = config.unet
    heads = u.num_heads if not u.head_channels else [u.model_channels * m // u.head_channels for m in u.channel_mult]
    return UNet2DConditionModel(block_out_channels=[u.model_channels * m for m in u.channel_mult],
                                cross_attention_dim=u.context_dim, attention_head_dim=heads,
                                use_linear_projection=u.linear_proj, layers_per_block=u.num_res_blocks,
                                ).to(device=device, dtype=dtype).eval().requires_grad_(False)


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd1", "sd2", "tiny"], default="sd1", help="architecture (random weights)")
    p.add_argument("--ckpt", help="time a real checkpoint instead of random weights")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="bf16 is ~3x faster than fp32 on AMX CPUs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", choices=["sdpa", "math"], default="sdpa")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images per call; CFG doubles it")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vs-diffusers", action="store_true", help="also time diffusers' UNet2DConditionModel")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    if args.ckpt:
        sd = load_checkpoint(args.ckpt, device=device, dtype=dtype)
        config, unet = sd.config, sd.unet
    else:
        config = PRESETS[args.model]
        unet = UNetModel(config.unet).to(device=device, dtype=dtype).channels_last().eval().requires_grad_(False)
    unet.set_attention(args.attention)
    b = 2 * args.batch
    x = torch.randn(b, 4, args.H // 8, args.W // 8, device=device, dtype=dtype)
    t = torch.full((b,), 500, device=device)
    context = torch.randn(b, 77, config.unet.context_dim, device=device, dtype=dtype)

    calls = {"ours": lambda: unet(x, t, context)}
    if args.vs_diffusers:
        theirs = diffusers_unet(config, dtype, device)
        if args.attention == "math":
            from diffusers.models.attention_processor import AttnProcessor
            theirs.set_attn_processor(AttnProcessor())
        calls["diffusers"] = lambda: theirs(x, t, context)
    with torch.inference_mode():
        times = compare(calls, args.runs, args.warmup, device)

    base = statistics.median(times["ours"])
    print(f"UNet call, {args.model if not args.ckpt else args.ckpt}, {args.H}x{args.W}, batch {b} (CFG), "
          f"{args.dtype}, {args.attention} attention, {device.type}, median of {args.runs} runs")
    print(f"{'':12} {'ms/call':>9} {'min-max':>15} {'vs ours':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:12} {med * 1e3:9.0f} {min(ts) * 1e3:7.0f}-{max(ts) * 1e3:<7.0f} {med / base:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds": times}, f, indent=1)


if __name__ == "__main__":
    main()
