"""Text-to-image with Stable Diffusion 1.x / 2.x, in the spirit of LDM's scripts/txt2img.py.

    python sample.py --prompt "a photograph of an astronaut riding a horse" --ckpt v1-5-pruned-emaonly.safetensors
    python sample.py --prompt "a red cube" --random-weights tiny --steps 10   # offline: noise from random weights

Without --ckpt the checkpoint is $SD_CKPT, else the official SD 1.5 file downloaded from the
Hugging Face hub (online only). Images are written as PNGs (never overwriting) with the
generation settings in a `parameters` text chunk (JSON).
"""
import argparse
import json
import os
import time
from dataclasses import asdict, replace

import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from cache import FULL, CacheSchedule
from cache import MODES as CACHE_MODES
from cache import PRESETS as ACCEL_PRESETS
from model import PRESETS, load_checkpoint, random_weights
from model.text import TokenizerError, byte_tokenizer
from model.unet import BasicTransformerBlock
from prune import LAYERS, TokenPruning
from prune import METHODS as PRUNE_METHODS
from prune.viz import PruneViz
from sampler import METHODS, Acceleration, check_args, final_latent, sample_steps, unet_calls
from sampler.schedule import timesteps

SD15 = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def resolve_checkpoint(ckpt):
    """--ckpt, else $SD_CKPT, else the official SD 1.5 single file from the hub (cached after the first download)."""
    ckpt = ckpt or os.environ.get("SD_CKPT")
    if ckpt:
        return ckpt
    try:
        from huggingface_hub import hf_hub_download
        print(f"no --ckpt given and SD_CKPT unset: fetching {SD15[1]} from {SD15[0]} (about 4 GB, once)")
        return hf_hub_download(*SD15)
    except Exception as e:
        raise SystemExit(f"could not download the SD 1.5 checkpoint ({type(e).__name__}: {e}).\n"
                         "Pass --ckpt PATH (a .safetensors/.ckpt file or a diffusers folder), or set SD_CKPT, "
                         "or run offline with --random-weights tiny (the output is noise).") from None


def read_prompts(prompt=None, from_file=None):
    if prompt is not None and from_file:
        raise ValueError("give either --prompt or --from-file, not both")
    if from_file:
        if not os.path.isfile(from_file):
            raise ValueError(f"prompt file {from_file!r} does not exist")
        with open(from_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {from_file!r} holds no prompts (one per line expected)")
        return prompts
    if prompt is None:
        raise ValueError("give a prompt (--prompt) or a prompt file (--from-file)")
    return [prompt]


def next_free_path(outdir):
    """outdir/NNNNN.png with the next unused number; created exclusively so nothing is overwritten."""
    numbers = [int(f[:-4]) for f in os.listdir(outdir) if f.endswith(".png") and f[:-4].isdigit()]
    n = max(numbers, default=-1) + 1
    while True:
        path = os.path.join(outdir, f"{n:05d}.png")
        try:
            return path, open(path, "xb")
        except FileExistsError:
            n += 1


def to_pil(images):
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(p.numpy()) for p in pixels]


def timed(fn, device, *args):
    """(fn(*args), wall-clock seconds), synchronising the GPU so its asynchronous work is counted."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


class Timer:
    """Seconds spent per phase (text, unet, decode) over a whole generate() call."""

    def __init__(self, device):
        self.device, self.totals = device, {}

    def __call__(self, phase, fn, *args):
        out, seconds = timed(fn, self.device, *args)
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds
        return out


def generate(prompts, *, ckpt=None, random=None, tokenizer=None, negative_prompt="", n_samples=1, n_iter=1,
             steps=50, scale=None, seed=42, H=None, W=None, sampler="plms", eta=0.0, prediction=None,
             device=None, dtype=None, attention="sdpa", outdir="outputs", accel=None, progress=True):
    """Generate images and write them as PNGs; returns the paths.

    prompts: list of prompts. One prompt makes n_samples copies per batch; several prompts are
    batched n_samples at a time. Everything is repeated n_iter times. Image k of the whole call
    starts from noise seeded with seed + k (drawn on the CPU, so it is the same on every device).
    random: a preset name ("sd1", "tiny", ...) to use random weights instead of a checkpoint.
    scale: guidance scale (default 7.5 for SD1, 9.0 for SD2); H, W: pixels, multiples of 8
    (default the model's native size); dtype: "fp32" | "fp16" | "bf16" (default fp16 on GPUs,
    fp32 on CPU; bf16 is about 2x faster than fp32 on CPUs with AMX).
    """
    # Everything that can be wrong with the arguments is checked before any weights are loaded.
    if not prompts:
        raise ValueError("no prompts given")
    for name, size in (("H", H), ("W", W)):
        if size is not None and (size <= 0 or size % 8):
            raise ValueError(f"{name}={size} must be a positive multiple of 8 (the VAE works on 8x8 pixel cells)")
    if n_samples < 1 or n_iter < 1:
        raise ValueError("n_samples and n_iter must be >= 1")
    check_args(steps, 1.0 if scale is None else scale, sampler, eta, prediction or "eps")
    if random is not None and random not in PRESETS:
        raise ValueError(f"unknown random-weights preset {random!r}; choose one of {list(PRESETS)}")
    if random is not None and ckpt:
        raise ValueError("give either a checkpoint or random weights, not both")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if accel is not None:   # schedules must fit this sampler and step count
        accel.check(unet_calls(steps, sampler))
    device = device or default_device()
    dtype = DTYPES[dtype or ("fp32" if torch.device(device).type == "cpu" else "fp16")]
    os.makedirs(outdir, exist_ok=True)

    timer = Timer(device)
    start = time.perf_counter()
    if random is not None:
        print(f"random weights ({random}): the images are noise, useful only to exercise the pipeline")
        config = replace(PRESETS[random], prediction=prediction or PRESETS[random].prediction)
        sd = random_weights(config, device=device, dtype=dtype, tokenizer=tokenizer or byte_tokenizer())
        source = f"random weights: {random}"
    else:
        source = resolve_checkpoint(ckpt)
        sd = load_checkpoint(source, device=device, dtype=dtype, prediction=prediction, tokenizer=tokenizer)
    sd.unet.set_attention(attention)
    if accel is not None and accel.viz is not None:
        blocks = [name for name, m in sd.unet.named_modules() if isinstance(m, BasicTransformerBlock)]
        if accel.viz.block not in blocks:
            raise ValueError(f"--viz-block {accel.viz.block!r} is not a transformer block of this UNet; "
                             f"choose one of {', '.join(blocks[:4])}, ... ({len(blocks)} in all)")
    config = sd.config
    scale = config.guidance if scale is None else scale
    H, W = H or config.image_size, W or config.image_size
    load_time = time.perf_counter() - start

    batches = [prompts * n_samples] if len(prompts) == 1 else \
        [prompts[i:i + n_samples] for i in range(0, len(prompts), n_samples)]
    n_steps = len(timesteps(steps))
    paths, k = [], 0
    with torch.inference_mode():
        for _ in range(n_iter):
            for batch in batches:
                seeds = [seed + k + i for i in range(len(batch))]
                cond = timer("text", sd.text, batch)
                uncond = timer("text", sd.text, [negative_prompt] * len(batch)) if scale != 1 else None
                x_T = torch.stack([torch.randn(4, H // 8, W // 8, generator=torch.Generator().manual_seed(s))
                                   for s in seeds]).to(device)
                loop = sample_steps(sd.unet, x_T, cond, uncond, steps, scale, sampler, eta, config.prediction,
                                    accel, seeds[0])
                bar = tqdm(loop, total=n_steps, desc=f"images {k}-{k + len(batch) - 1}", disable=not progress)
                latent = timer("unet", final_latent, bar)
                images = timer("decode", sd.vae.decode, latent.to(device))
                for prompt, s, image in zip(batch, seeds, to_pil(images)):
                    params = dict(prompt=prompt, negative_prompt=negative_prompt, seed=s, steps=steps, scale=scale,
                                  sampler=sampler, eta=eta, H=H, W=W, checkpoint=source, model=config.version,
                                  prediction=config.prediction, dtype=str(dtype).removeprefix("torch."),
                                  attention=attention, acceleration=asdict(accel) if accel else None)
                    info = PngImagePlugin.PngInfo()
                    info.add_text("parameters", json.dumps(params))
                    path, f = next_free_path(outdir)
                    with f:
                        image.save(f, format="PNG", pnginfo=info)
                    paths.append(path)
                k += len(batch)

    t = timer.totals
    total = time.perf_counter() - start
    print(f"{len(paths)} image(s) in {outdir}/  |  load {load_time:.1f}s, text {t.get('text', 0):.2f}s, "
          f"UNet {t['unet']:.1f}s ({t['unet'] / len(paths):.2f}s/image), decode {t['decode']:.1f}s, total {total:.1f}s")
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="the text prompt")
    p.add_argument("--from-file", help="a file with one prompt per line (instead of --prompt)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: the empty prompt)")
    p.add_argument("--n-samples", type=int, default=1, help="images per batch")
    p.add_argument("--n-iter", type=int, default=1, help="how many times to repeat the batches")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (PLMS-50 = 51 UNet calls)")
    p.add_argument("--scale", type=float, help="guidance scale (default 7.5 for SD1, 9.0 for SD2)")
    p.add_argument("--seed", type=int, default=42, help="image k uses seed + k")
    p.add_argument("--H", type=int, help="height in pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--W", type=int, help="width in pixels, a multiple of 8")
    p.add_argument("--sampler", choices=METHODS, default="plms")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic; PLMS needs 0)")
    p.add_argument("--ckpt", help=".safetensors / .ckpt file or diffusers folder (default: $SD_CKPT, else download SD 1.5)")
    p.add_argument("--random-weights", choices=list(PRESETS), help="random weights of this architecture (offline test runs)")
    p.add_argument("--tokenizer", help="folder with vocab.json + merges.txt, or a hub id")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    p.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default fp16 on GPUs, fp32 on CPU (bf16: fast on AMX CPUs)")
    p.add_argument("--attention", choices=["sdpa", "math"], default="sdpa",
                   help="math materialises the score matrix as the original LDM code did")
    p.add_argument("--outdir", default="outputs")

    g = p.add_argument_group("token pruning (prune/)")
    g.add_argument("--prune", choices=("none",) + PRUNE_METHODS, default="none", help="token method (none)")
    g.add_argument("--prune-ratio", type=float, help="fraction of tokens removed per block (0.5, max 0.75)")
    g.add_argument("--prune-maxdown", type=int, choices=(1, 2, 4, 8),
                   help="prune blocks at most this much below the latent resolution (1: the five 64x64 blocks)")
    g.add_argument("--prune-layers", type=lambda text: tuple(text.split(",")),
                   help=f"comma-separated sub-layers from {','.join(LAYERS)} (attn1 = self-attention only)")
    g.add_argument("--prune-noise", type=float, help="SiTo/DaTo noise weight on the base-token score (0.1)")
    g.add_argument("--prune-recover", choices=("kept", "base"),
                   help="SiTo/DaTo: pruned tokens copy the most similar kept token (code, default) or base token (paper)")
    g.add_argument("--prune-schedule", help="one ratio per UNet call, comma-separated (PLMS-50: 51 values)")
    g.add_argument("--viz-prune", metavar="DIR", help="save a picture of one block's base/kept/pruned tokens per call")
    g.add_argument("--viz-block", default="input_blocks.1.1.transformer_blocks.0", help="the block --viz-prune shows")

    g = p.add_argument_group("feature caching (cache/)")
    g.add_argument("--cache", choices=("none",) + CACHE_MODES, default="none",
                   help="uniform / nonuniform (DeepCache) or dato (an explicit per-call --cache-schedule)")
    g.add_argument("--cache-interval", type=int, help="a full UNet call every N calls (5)")
    g.add_argument("--cache-depth", type=int,
                   help="blocks recomputed on each side by cached calls: 0 (reuse all) .. 11 (2: DeepCache SD)")
    g.add_argument("--cache-center", type=int, help="nonuniform: call around which full calls are densest (15)")
    g.add_argument("--cache-power", type=float, help="nonuniform: DeepCache's power (1.4)")
    g.add_argument("--cache-schedule", help=f"one depth per UNet call, comma-separated, {FULL} = full call "
                                            "(first entry must be full)")
    g.add_argument("--preset", choices=list(ACCEL_PRESETS),
                   help="published settings: " + "; ".join(f"{k}: {v.about}" for k, v in ACCEL_PRESETS.items()))
    args = p.parse_args(argv)
    try:
        prompts = read_prompts(args.prompt, args.from_file)
        generate(prompts, ckpt=args.ckpt, random=args.random_weights, tokenizer=args.tokenizer,
                 negative_prompt=args.negative_prompt, n_samples=args.n_samples, n_iter=args.n_iter,
                 steps=args.steps, scale=args.scale, seed=args.seed, H=args.H, W=args.W, sampler=args.sampler,
                 eta=args.eta, prediction=args.prediction, device=args.device, dtype=args.dtype,
                 attention=args.attention, outdir=args.outdir, accel=acceleration(args))
    except ValueError as e:   # bad arguments, checkpoint or schedule: usage and the reason
        p.error(str(e))
    except TokenizerError as e:
        raise SystemExit(f"error: {e}") from None


def numbers(text, kind, what):
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


# tuning flags (argparse dests) -> the TokenPruning / CacheSchedule fields they set
PRUNE_FLAGS = {"prune_ratio": "ratio", "prune_maxdown": "max_downsample", "prune_noise": "noise_alpha",
               "prune_recover": "recover_from", "prune_layers": "layers"}
CACHE_FLAGS = {"cache_interval": "interval", "cache_depth": "depth", "cache_center": "center", "cache_power": "power"}


def given(args, names):
    """The command-line flags among `names` (argparse dests) that were set."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]


def settings(args, flags):
    """{field: value} of the flags that were set (the dataclass defaults fill in the rest)."""
    return {field: getattr(args, dest) for dest, field in flags.items() if getattr(args, dest) is not None}


def acceleration(args):
    """The Acceleration the command line asks for, or None. Tuning flags default to None so that
    one given without its method (or beside a --preset, which fixes them) is an error, not ignored."""
    prune_flags = given(args, PRUNE_FLAGS)
    shape_flags = given(args, ["cache_interval", "cache_depth"])   # uniform and nonuniform
    curve_flags = given(args, ["cache_center", "cache_power"])     # nonuniform only
    if args.preset:
        if args.prune != "none" or args.cache != "none":
            raise ValueError("--preset sets both caching and pruning; leave out --prune and --cache")
        if fixed := prune_flags + shape_flags + curve_flags + given(args, ["cache_schedule"]):
            raise ValueError(f"--preset {args.preset} fixes its settings; leave out {', '.join(fixed)} "
                             "(or spell the method out with --prune/--cache)")
        preset = ACCEL_PRESETS[args.preset]
        prune, cache = preset.prune, preset.cache
    else:
        if prune_flags and args.prune == "none":
            raise ValueError(f"{', '.join(prune_flags)} given without a pruning method: add --prune tome|sito|dato")
        if args.prune == "tome" and (sito_only := given(args, ["prune_noise", "prune_recover"])):
            raise ValueError(f"{', '.join(sito_only)}: no effect with --prune tome (SiTo/DaTo settings)")
        if args.cache_schedule and args.cache != "dato":
            raise ValueError("--cache-schedule is an explicit per-call schedule: use it with --cache dato")
        unused = {"none": shape_flags + curve_flags, "uniform": curve_flags, "nonuniform": [],
                  "dato": shape_flags + curve_flags}[args.cache]
        if unused:
            raise ValueError(f"{', '.join(unused)}: no effect with --cache {args.cache}; "
                             "interval and depth are for uniform/nonuniform, center and power for nonuniform")
        prune = None if args.prune == "none" else TokenPruning(args.prune, **settings(args, PRUNE_FLAGS))
        depths = numbers(args.cache_schedule, int, "--cache-schedule") if args.cache_schedule else ()
        cache = None if args.cache == "none" else CacheSchedule(args.cache, depths=depths, **settings(args, CACHE_FLAGS))
    if args.prune_schedule:
        if prune is None:
            raise ValueError("--prune-schedule needs a pruning method (--prune or a --preset with pruning)")
        prune = replace(prune, schedule=numbers(args.prune_schedule, float, "--prune-schedule"))
    viz = PruneViz(args.viz_prune, args.viz_block) if args.viz_prune else None
    if viz and not prune:
        raise ValueError("--viz-prune needs a pruning method (--prune tome|sito|dato)")
    return Acceleration(prune, cache, viz) if prune or cache else None


if __name__ == "__main__":
    main()
