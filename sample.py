r"""Text-to-image with Stable Diffusion 1.x, 2.x and XL, in the spirit of LDM's scripts/txt2img.py.

    python sample.py --prompt "a photograph of an astronaut riding a horse" \
        --ckpt v1-5-pruned-emaonly.safetensors
    # offline: noise from random weights
    python sample.py --prompt "a red cube" --random-weights tiny --steps 10

Without --ckpt the checkpoint is $SD_CKPT, else the official SD 1.5 file downloaded from the
Hugging Face hub (online only). Images are written as PNGs (never overwriting) with the
generation settings in a `parameters` text chunk (JSON). LDM's spellings (--n_samples,
--ddim_steps, --plms, --ddim_eta, --from_file, --n_iter) are accepted too, and diffusers' and
A1111's (--width, --height, --num-inference-steps, --guidance-scale, --cfg-scale).
"""
import os
import signal
import sys

# Ctrl-C while torch loads: one line, not a traceback (run_tool restores Python's handler)
if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted while starting up"))

import time
from dataclasses import fields, replace

from accel import PRESETS as ACCEL_PRESETS
from accel import Acceleration, Gate, Guidance, Skip, check_preset_fits, find_preset
from accel.guidance import MODES as GUIDANCE
from accel.guidance import OUTSIDE as GUIDANCE_OUTSIDE
from cache import FULL, CacheSchedule
from cache import MODES as CACHE_MODES
from model.hardware import check_device, dtype_name, resolve_dtype
from prune import METHODS as PRUNE_METHODS
from prune import token_method
from prune.viz import PruneViz
from sampler.cli import (
    Parser,
    add_model_flags,
    add_sampling_flags,
    load_model,
    parse_numbers,
    read_prompts,
    resolve_run,
    run_tool,
    sampling,
)
from sampler.generate import Timer, check_outdir, generate, generate_batches, save_pngs


def image_prompts(prompts, n_samples, n_iter):
    """The prompt of every image, in order: one prompt is repeated n_samples times per batch,
    several are batched n_samples at a time; everything n_iter times."""
    return (prompts * n_samples if len(prompts) == 1 else prompts) * n_iter


def run(args):
    """Check everything, load the model, write the images; returns the paths."""
    if args.n_iter < 1:
        raise ValueError("--n-iter (how many times the batches repeat) must be >= 1, got "
                         f"{args.n_iter}")
    prompts = image_prompts(read_prompts(args.prompt, args.from_file), args.n_samples, args.n_iter)
    if args.preset is not None and not args.preset.strip():
        raise ValueError("--preset is empty: name a preset or a schedule file FILE.json[#k], or "
                         "leave the flag out")
    if args.preset and "@" in args.preset:
        base, _, run = args.preset.partition("@")
        raise ValueError(f"--preset {args.preset!r}: '@{run}' is the run of a --methods entry; "
                         f"here give the preset alone ({base}) and the run as --sampler and "
                         "--steps (a schedule file carries its own)")
    preset = find_preset(args.preset) if args.preset else None   # a schedule file is read once
    accel = acceleration(args, preset)
    taken = resolve_run(args, preset.made_for if preset else None)
    if preset:
        check_preset_fits(args.preset, args.sampler, args.steps, preset)
    settings = sampling(args, seed=args.seed, accel=accel, batch_size=args.n_samples)
    check_outdir(args.outdir, "--outdir")
    if args.viz_prune:
        check_outdir(args.viz_prune, "--viz-prune")
    device = check_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    start = time.perf_counter()
    sd = load_model(args, device, dtype)
    load_time = time.perf_counter() - start
    timer, paths = Timer(device), []
    try:
        warm = warm_up(sd, prompts, settings) if args.compile else ""
        for images, _ in generate_batches(sd, prompts, settings, progress=True, timer=timer):
            paths += save_pngs(images, args.outdir)
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted after {len(paths)} image(s)"
                         + (f" (in {args.outdir}/)" if paths else "")) from None
    t, taken = timer.totals, f"  |  {taken}" if taken else ""
    files = paths[0] if len(paths) == 1 else f"{paths[0]} .. {os.path.basename(paths[-1])}"
    print(f"{len(paths)} image(s): {files}  |  {dtype_name(dtype)} on {device}  |  "
          f"load {load_time:.1f}s, text {t.get('text', 0):.2f}s, UNet {t['unet']:.1f}s "
          f"({t['unet'] / len(paths):.2f}s/image), decode {t['decode']:.1f}s, "
          f"total {time.perf_counter() - start:.1f}s" + warm + taken)
    return paths


def warm_up(sd, prompts, settings):
    """--compile: one untimed batch with the run's settings, which compiles the UNet's layers for
    them (the timed batches then run compiled) -> its part of the summary line."""
    start = time.perf_counter()
    generate(sd, prompts[:settings.batch_size], settings)
    return f" (of which compile and warm-up {time.perf_counter() - start:.1f}s, an untimed batch)"


def parser():
    p = Parser(prog="sample.py", description=__doc__)
    p.add_argument("--prompt", help="the text prompt")
    p.add_argument("--from-file", "--from_file",
                   help="a file with one prompt per line (instead of --prompt)")
    p.add_argument("--n-samples", "--n_samples", type=int, default=1,
                   help="images per batch (default: 1)")
    p.add_argument("--n-iter", "--n_iter", type=int, default=1,
                   help="how many times to repeat the batches (default: 1)")
    p.add_argument("--seed", type=int, default=42, help="image k uses seed + k (default: 42)")
    add_sampling_flags(p)
    add_model_flags(p)
    p.add_argument("--outdir", default="outputs",
                   help="folder for the PNGs, created with the first image; files are never "
                        "overwritten (default: outputs)")

    g = p.add_argument_group("token methods (prune/)")
    g.add_argument("--prune", choices=("none", *PRUNE_METHODS), help="token method (default: none)")
    for dest, (flag, meta, _) in PRUNE_FLAGS.items():   # every method's settings, from the registry
        g.add_argument(flag, dest=dest, type=meta["type"], choices=meta["choices"],
                       help=meta["help"])
    g.add_argument("--prune-schedule",
                   help="one ratio per UNet call, comma-separated (PLMS-50: 51 values)")
    g.add_argument("--viz-prune", metavar="DIR",
                   help="save a picture of one block's base/kept/pruned tokens per call")
    g.add_argument("--viz-block", help=f"the block --viz-prune shows (default: {VIZ_BLOCK})")

    g = p.add_argument_group("feature caching (cache/)")
    g.add_argument("--cache", choices=("none", *CACHE_MODES),
                   help="uniform / nonuniform (DeepCache) or dato (an explicit per-call "
                        "--cache-schedule; default: none)")
    g.add_argument("--cache-interval", type=int, help="a full UNet call every N calls (5)")
    g.add_argument("--cache-depth", type=int, help="blocks recomputed on each side by cached "
                   f"calls: 0 (reuse all) .. {FULL - 1} (2: DeepCache SD)")
    g.add_argument("--cache-center", type=int,
                   help="nonuniform: call around which full calls are densest (15)")
    g.add_argument("--cache-power", type=float, help="nonuniform: DeepCache's power (1.4)")
    g.add_argument("--cache-order", type=int, help="cached calls start from the newest features "
                   "(0, DeepCache) or a forecast from the last 2 or 3 full calls, linear (1) or "
                   "quadratic (2) in log-SNR")
    g.add_argument("--cache-schedule", help=f"one depth per UNet call, comma-separated, {FULL} = "
                   "full call (first entry must be full)")
    g = p.add_argument_group(
        "guidance, skipped calls, timesteps and a cross-attention gate (accel/)")
    g.add_argument("--guidance-window", metavar="LO,HI", help="guide only the UNet calls whose "
                   "noise level sigma is in (LO, HI]; the others run one branch "
                   "(--guidance-outside)")
    g.add_argument("--guidance-outside", choices=GUIDANCE_OUTSIDE, help="calls outside the "
                   "window: cond (the conditional prediction alone, the default) or reuse (plus "
                   "the last guided call's difference)")
    g.add_argument("--guidance-schedule",
                   help=f"one mode per UNet call, comma-separated: {', '.join(GUIDANCE)}")
    g.add_argument("--guidance-stop", type=float, metavar="COS", help="adaptive guidance: each "
                   "image's guided calls run one branch once its two predictions agree, "
                   "cosine > COS (e.g. 0.99)")
    g.add_argument("--skip", metavar="CALLS", help="UNet calls (indices >= 2, never two in a row) "
                   "replaced by extrapolating the last two estimates, e.g. 3,5,7")
    g.add_argument("--gate", type=int, metavar="CALL", help="T-GATE: from UNet call CALL on, "
                   "every cross-attention reads its output at call CALL-1 (the mean of the two "
                   "branches) and the call runs one branch (e.g. 4 of DPM++(2M)-10)")
    g.add_argument("--timesteps", help="the run's timesteps, one per step, descending (e.g. Align "
                   "Your Steps' SD1.5 ten: 999,850,736,645,545,455,343,233,124,24)")
    g.add_argument("--preset", metavar="NAME|FILE.json[#k]",
                   help="published settings: "
                        + "; ".join(f"{k}: {v.about}" for k, v in ACCEL_PRESETS.items())
                        + "; or a schedule file (search.py's: FILE.json#k is its point k)")
    return p


def main(argv=None):
    return run_tool(parser(), run, argv, flags=SETTING_FLAGS)


def prune_flags():
    """{argparse dest: (--prune-FLAG, its metadata, {method: settings field})} of every setting()
    field of the registered token methods; methods that share a flag share it here."""
    flags = {}
    for name, cls in PRUNE_METHODS.items():
        for f in fields(cls):
            if "flag" in f.metadata:
                dest = f"prune_{f.metadata['flag']}"
                flags.setdefault(
                    dest, (f"--prune-{f.metadata['flag']}", f.metadata, {}))[2][name] = f.name
    return flags


# tuning flags (argparse dests) -> the token method / CacheSchedule fields they set
PRUNE_FLAGS = prune_flags()
CACHE_FLAGS = {"cache_interval": "interval", "cache_depth": "depth", "cache_center": "center",
               "cache_power": "power", "cache_order": "order"}
# the settings whose flag is not --SETTING: what an error about one names (run_tool)
SETTING_FLAGS = {"batch_size": "--n-samples", "viz": "--viz-prune", "folder": "--viz-prune",
                 "block": "--viz-block",
                 **{field: f"--cache-{field}" for field in CACHE_FLAGS.values()},
                 **{field: flag for flag, _, owners in PRUNE_FLAGS.values()
                    for field in owners.values()}}
# --viz-prune's block: SD's first 64x64 one at 512 px
VIZ_BLOCK = "input_blocks.1.1.transformer_blocks.0"


def flags_set(args, dests):
    """The command-line flags among `dests` (argparse dests) that were given."""
    return [f"--{n.replace('_', '-')}" for n in dests if getattr(args, n) is not None]


def fields_from_flags(args, flags):
    """{dataclass field: value} of the given flags among `flags` (defaults fill in the rest)."""
    return {field: getattr(args, dest) for dest, field in flags.items()
            if getattr(args, dest) is not None}


def method_settings(args):
    """The settings of --prune's method from its flags; a flag of another method is refused."""
    given = {dest: owners for dest, (_, _, owners) in PRUNE_FLAGS.items()
             if getattr(args, dest) is not None}
    if foreign := {PRUNE_FLAGS[dest][0]: owners for dest, owners in given.items()
                   if args.prune not in owners}:
        owners = sorted({name for methods in foreign.values() for name in methods})
        raise ValueError(f"{', '.join(foreign)}: no effect with --prune {args.prune} "
                         f"(a setting of {', '.join(owners)})")
    return token_method(args.prune, **{owners[args.prune]: getattr(args, dest)
                                       for dest, owners in given.items()})


def preset_settings(args, preset, prune_flags, cache_flags):
    """(prune, cache) of --preset (`preset`, found); the flags it fixes are refused (--cache none
    too), naming what to do instead."""
    if args.prune is not None or args.cache is not None:
        if (preset.prune is None and preset.cache.mode != "dato"
                and args.prune not in (None, "none")):   # add pruning
            raise ValueError(f"--preset {args.preset} fixes caching and prunes nothing; to add "
                             f"pruning, spell the caching out (--cache {preset.cache.mode} "
                             f"--cache-interval {preset.cache.interval} "
                             f"--cache-depth {preset.cache.depth}) and add --prune")
        given = [f"--{flag} {getattr(args, flag)}" for flag in ("prune", "cache")
                 if getattr(args, flag) is not None]
        raise ValueError(f"--preset {args.preset} fixes caching and pruning; leave out "
                         f"{' and '.join(given)}")
    if fixed := prune_flags + cache_flags:
        raise ValueError(f"--preset {args.preset} fixes its settings; leave out {', '.join(fixed)} "
                         "(or spell the method out with --prune/--cache)")
    return preset.prune, preset.cache


def acceleration(args, preset=None):
    """The Acceleration the command line asks for (`preset`: --preset's, found), or None. Tuning
    flags default to None so that one given without its method (or beside a --preset, which fixes
    them) is an error."""
    prune_flags = flags_set(args, PRUNE_FLAGS)
    if args.prune_schedule is not None and not args.prune_schedule.strip():
        raise ValueError("--prune-schedule is empty: give one ratio per UNet call, or leave the "
                         "flag out")
    if args.viz_block and not args.viz_prune:
        raise ValueError("--viz-block chooses the block --viz-prune draws: add --viz-prune DIR, "
                         "or leave it out")
    # a preset that prunes or caches fixes those flags; one of timesteps or guidance adds to them
    if preset is not None and (preset.prune or preset.cache):
        cache_flags = flags_set(args, [*CACHE_FLAGS, "cache_schedule"])
        prune, cache = preset_settings(args, preset, prune_flags, cache_flags)
    else:
        args.prune, args.cache = args.prune or "none", args.cache or "none"
        if prune_flags and args.prune == "none":
            raise ValueError(f"{', '.join(prune_flags)} given without a token method: add --prune "
                             f"{'|'.join(PRUNE_METHODS)}")
        if args.cache_schedule and args.cache != "dato":
            raise ValueError("--cache-schedule is an explicit per-call schedule: use it with "
                             "--cache dato")
        reads = CACHE_MODES[args.cache].reads if args.cache != "none" else ()
        if unused := [f for dest, f in CACHE_FLAGS.items()
                      if getattr(args, dest) is not None and f not in reads]:
            unused = [f"--cache-{f}" for f in unused]
            raise ValueError(f"{', '.join(unused)}: no effect with --cache {args.cache}; "
                             "interval and depth are for uniform/nonuniform, center and power for "
                             "nonuniform, order for any")
        prune = None if args.prune == "none" else method_settings(args)
        depths = (parse_numbers(args.cache_schedule, int, "--cache-schedule")
                  if args.cache_schedule else ())
        cache = None if args.cache == "none" else CacheSchedule(
            args.cache, depths=depths, **fields_from_flags(args, CACHE_FLAGS))
    if args.prune_schedule:
        if prune is None:
            raise ValueError("--prune-schedule needs a token method (--prune or a --preset with "
                             "pruning)")
        if "schedule" not in {f.name for f in fields(prune)}:
            raise ValueError(f"--prune-schedule: {prune.name} takes no per-call ratios "
                             "(use --prune-stop for ToDo)")
        prune = replace(prune,
                        schedule=parse_numbers(args.prune_schedule, float, "--prune-schedule"))
    viz = PruneViz(args.viz_prune, args.viz_block or VIZ_BLOCK) if args.viz_prune else None
    guidance, skip, timesteps, gate = plan_settings(args, preset)
    if not (prune or cache or viz or guidance or skip or timesteps or gate):
        return None
    return Acceleration(prune, cache, viz, guidance, skip, timesteps, gate)


def plan_settings(args, preset):
    """(guidance, skip, timesteps, gate) of the flags, on top of a preset's: a flag that the preset
    fixes is refused."""
    if args.guidance_outside and not args.guidance_window:
        raise ValueError("--guidance-outside says what the calls outside --guidance-window do: "
                         "give the window too")
    if args.guidance_window and args.guidance_schedule:
        raise ValueError("give either --guidance-window or --guidance-schedule, not both")
    guidance = skip = timesteps = None
    stop = {"stop": args.guidance_stop} if args.guidance_stop is not None else {}
    if args.guidance_window:
        window = parse_numbers(args.guidance_window, float, "--guidance-window")
        guidance = Guidance(window=window, outside=args.guidance_outside or "cond", **stop)
    elif args.guidance_schedule:
        guidance = Guidance(modes=tuple(m.strip() for m in args.guidance_schedule.split(",")),
                            **stop)
    elif stop:
        guidance = Guidance(**stop)
    if args.skip:
        skip = Skip(parse_numbers(args.skip, int, "--skip"))
    if args.timesteps:
        timesteps = parse_numbers(args.timesteps, int, "--timesteps")
    gate = Gate(args.gate) if args.gate is not None else None
    for what, flag, value, fixed in (
            ("guidance", "--guidance-window/--guidance-schedule/--guidance-stop", guidance,
             preset and preset.guidance),
            ("skipped calls", "--skip", skip, preset and preset.skip),
            ("timesteps", "--timesteps", timesteps, preset and preset.timesteps),
            ("gate", "--gate", gate, preset and preset.gate)):
        if value and fixed:
            raise ValueError(f"--preset {args.preset} fixes its {what}; leave out {flag}")
    if preset is not None:
        guidance, skip, timesteps = (guidance or preset.guidance, skip or preset.skip,
                                     timesteps or preset.timesteps)
        gate = gate or preset.gate
    return guidance, skip, timesteps or (), gate


if __name__ == "__main__":
    main()
