"""Benchmark: speed, MACs and memory of every acceleration method, against our baseline and diffusers.

    python -m tools.bench --dtype bf16 --vs-diffusers                      # the default method list, SDPA
    python -m tools.bench --methods baseline,sito:0.5,deepcache-n5,dato-coco --attention sdpa,math --plot speed.png
    python -m tools.bench --selection                                       # token-selection cost per block

Methods (--methods, tools/specs.py): `baseline`, token methods (`sito:0.5`), presets and schedule files, each on the
command's run or its own (`deepcache-n3@dpmpp-2m:25`), sped up against `baseline`, the command's run. Weights are
random unless --ckpt is given. --dtype auto: bf16 on CPUs with native bf16 units, fp32 on others, fp16 on GPUs.

How it measures. A run's UNet calls (PLMS-50: 51) are each of a kind: full or cached at some depth, pruned at some
ratio, guided or not. Each distinct kind is timed on its own (median of --runs after --warmup; all kinds of all
methods alternate run by run, seeing the same machine load); a method's run time is the sum over its calls of their
kinds' medians (`--e2e` also times real runs to check it). Speed-ups are against our baseline with the same attention
backend, in the same process. MACs are analytic (model/macs.py), per image, with and without the attention matmuls.
Peak memory is the largest rise over a call's start (CUDA: allocated bytes; CPU: the resident set, freed heap
returned first: the large buffers reliably, small ones not)."""
import copy
import importlib.util
import json
import math
import os
import statistics
import time

import torch

from model import compile_unet, load_checkpoint, random_weights
from model.checkpoint import ARCHITECTURES, CONFIG_KEY, read_metadata
from model.compile import compiled_graphs
from model.config import config_from_json
from model.hardware import DTYPE_CHOICES, check_device, dtype_name, resolve_dtype
from model.unet import ATTENTION_BACKENDS, UNetModel, added_conditioning
from prune import DaTo, SiTo, ToMe
from sampler import SAMPLERS, unet_calls
from sampler.generate import Sampling, Timer, check_size, generate
from tools.cli import RANDOM_ARCHITECTURES, Parser, architecture, run_tool
from tools.measure import (
    compare,
    cpu_description,
    diffusers_unet,
    kb,
    kind_call,
    kind_macs,
    kind_name,
    kind_settings,
    official_selection,
    peak_memory,
    random_unet,
    run_macs,
    run_plans,
)
from tools.plots import draw_speedups
from tools.specs import method_syntax, parse_methods, parse_run_method

DEFAULT_METHODS = ("baseline,tome:0.3,tome:0.5,tome:0.7,sito:0.3,sito:0.5,sito:0.7,dato:0.5,todo:2,todo:3,"
                   "deepcache-n3,deepcache-n5,dato-fixed,dato-coco")


def bench_methods(args, unets, config, methods, attention, device, dtype, diffusers=False):
    """Time every distinct call kind of every method on each UNet of `unets` ({"eager": unet}, and with
    --compile "compiled": a compiled copy), all kinds of both alternating run by run; compose per-run numbers.
    -> ({variant: rows}, {variant: warm-up}): the seconds and graphs compiled by each kind's first calls, and
    the graphs compiled after them (0 when nothing recompiles)."""
    unet = unets["eager"]
    b, hw = 2 * args.batch, (args.H // config.vae.factor, args.W // config.vae.factor)
    x = torch.randn(b, config.unet.in_channels, *hw, device=device, dtype=dtype)
    t = torch.full((b,), 500, device=device)
    cond = {"context": torch.randn(b, 77, config.unet.context_dim, device=device, dtype=dtype)}
    if config.unet.adm_in_channels:   # SDXL: the pooled embedding and the size ids of this run
        pooled = torch.randn(b, config.text2.projection, device=device, dtype=dtype)
        ids = torch.tensor([[args.H, args.W, 0, 0, args.H, args.W]] * b, device=device)
        cond["y"] = added_conditioning(pooled, ids, config.size_embed_dim)
        added = {"text_embeds": pooled, "time_ids": ids}
    calls = unet_calls(args.steps, args.sampler)   # the command's run: what "baseline" and diffusers make
    plan = {spec: run_plans(m.accel, m.calls, m.sigmas) for spec, m in methods.items()}
    keys = {spec: [kind_settings(methods[spec].accel, kind) for kind in kinds] for spec, kinds in plan.items()}
    fns, warm = {}, {}
    for variant, model in unets.items():
        model.set_attention(attention)
        graphs, start = compiled_graphs(), time.perf_counter()
        with torch.inference_mode():   # each kind's first calls (its state, one run): where a compiled UNet compiles
            for key in dict.fromkeys(k for ks in keys.values() for k in ks if k is not None):
                fns[variant, key] = kind_call(model, key, x, t, cond)
                fns[variant, key]()
        warm[variant] = {"seconds": time.perf_counter() - start, "graphs": compiled_graphs() - graphs}
    if diffusers:
        theirs = diffusers_unet(unet, config, attention)
        extra = {"added_cond_kwargs": added} if "y" in cond else {}
        fns["diffusers"] = lambda: theirs(x.contiguous(), t, cond["context"], **extra).sample
        with torch.inference_mode():   # the same weights: the same output, up to rounding
            ours, reference = unet(x, t, **cond), fns["diffusers"]()
        difference = ((ours - reference).abs().max() / reference.abs().max()).item()
        print(f"diffusers' UNet on the same weights and inputs: max |ours - diffusers| / max |diffusers| = "
              f"{difference:.1e}")
    graphs = compiled_graphs()
    with torch.inference_mode():
        times = compare(fns, args.runs, args.warmup, device)
        memory = {key: peak_memory(fn, device) for key, fn in fns.items()}
    for w in warm.values():
        w["graphs_after"] = compiled_graphs() - graphs   # by any of them: the eager UNet compiles none

    tables = {}
    for variant in unets:
        rows = tables[variant] = {}
        for spec, kinds in plan.items():
            ks = [(variant, k) for k in keys[spec] if k is not None]
            run = {f.__name__: sum(f(times[k]) for k in ks) for f in (statistics.median, min, max)}
            macs = {mm: sum(kind_macs(unet, methods[spec].accel, k, hw, mm) for k in kinds) for mm in (False, True)}
            n = len(kinds)   # this method's UNet calls (its own run's)
            rows[spec] = dict(calls=n, sampler=methods[spec].sampler, steps=methods[spec].steps, run_s=run["median"],
                              run_min_s=run["min"], run_max_s=run["max"], call_ms=1e3 * run["median"] / n,
                              call_min_ms=1e3 * run["min"] / n, call_max_ms=1e3 * run["max"] / n,
                              gmacs_call=macs[False] / n / 1e9, gmacs_call_mm=macs[True] / n / 1e9,
                              gmacs_run=macs[False] / 1e9, gmacs_run_mm=macs[True] / 1e9,
                              peak_mb=max((memory[k] or 0) for k in ks) / 2 ** 20,
                              kinds={kind_name(k): kinds.count(k) for k in dict.fromkeys(kinds)})
        if diffusers and variant == "eager":
            ts = times["diffusers"]
            rows["diffusers"] = dict(calls=calls, run_s=statistics.median(ts) * calls,
                                     call_ms=statistics.median(ts) * 1e3, call_min_ms=min(ts) * 1e3,
                                     call_max_ms=max(ts) * 1e3, peak_mb=(memory["diffusers"] or 0) / 2 ** 20,
                                     relative_difference=difference)
        base = rows.get("baseline", {}).get("run_s")
        for row in rows.values():
            row["speedup"] = base / row["run_s"] if base else None
            has_macs = base and "gmacs_run" in row
            row["macs_ratio"] = rows["baseline"]["gmacs_run"] / row["gmacs_run"] if has_macs else None
    return tables, warm


def add_e2e(rows, sd, methods, args, attention, device):
    """rows[spec]["e2e_s"]: the UNet seconds of one real sampling run, generate() on a prompt per batch image."""
    for spec, m in methods.items():
        run = Sampling(steps=m.steps, scale=7.5, sampler=m.sampler, seed=0, size=(args.H, args.W),
                       attention=attention, accel=m.accel, batch_size=args.batch)
        timer = Timer(device)
        generate(sd, ["a red cube on a table"] * args.batch, run, timer=timer)
        rows[spec]["e2e_s"] = timer.totals["unet"]


def ratio_text(value, width):
    return f"{value:{width - 1}.2f}x" if value is not None else f"{'-':>{width}}"


def print_rows(rows, args, attention, device, dtype):
    print(f"\n{args.ckpt or args.model}, {args.H}x{args.W}, CFG batch {2 * args.batch}, {dtype_name(dtype)}, "
          f"{attention}, {device}; the baseline is {args.sampler.upper()}-{args.steps} = "
          f"{unet_calls(args.steps, args.sampler)} UNet calls; median of {args.runs} runs")
    if device.type == "cpu":
        print(f"CPU: {cpu_description()}")
    print(f"{'method':24} {'ms/call':>8} {'min-max':>13} {'UNet s/run':>10} {'speed-up':>8} {'GMAC/call':>9} "
          f"{'+attn mm':>8} {'GMAC/run':>9} {'MAC ratio':>9} {'peak MB':>8}" + (f" {'e2e s':>7}" if args.e2e else "")
          + (f" {'vs eager':>8}" if any("vs_eager" in r for r in rows.values()) else ""))
    for name, r in rows.items():
        macs = (f"{r['gmacs_call']:9.1f} {r['gmacs_call_mm']:8.1f} {r['gmacs_run']:9.0f} "
                f"{ratio_text(r['macs_ratio'], 9)}" if "gmacs_run" in r else f"{'':9} {'':8} {'':9} {'':9}")
        print(f"{name:24} {r['call_ms']:8.0f} {r['call_min_ms']:6.0f}-{r['call_max_ms']:<6.0f} {r['run_s']:10.1f} "
              f"{ratio_text(r['speedup'], 8)} {macs} {r['peak_mb']:8.0f}"
              + (f" {r['e2e_s']:7.1f}" if "e2e_s" in r else "")
              + (f" {r['vs_eager']:7.2f}x" if "vs_eager" in r else ""))


def macs_table(args, methods):
    """--macs-only: every method's analytic MACs per image at --H x --W, printed (the UNet on the meta
    device: instant at any size, e.g. SDXL at 1024 px); MAC ratios against the command's run."""
    config = architecture(args.model)[0]
    args.H, args.W = check_size(config, (args.H, args.W))
    with torch.device("meta"):
        unet = UNetModel(config.unet)
    hw, calls = (args.H // config.vae.factor, args.W // config.vae.factor), unet_calls(args.steps, args.sampler)
    base = [run_macs(unet, None, calls, hw, mm) for mm in (False, True)]
    print(f"\n{args.model}, {args.H}x{args.W}: analytic MACs per image; the baseline is {args.sampler.upper()}-"
          f"{args.steps} = {calls} UNet calls\n{'method':28} {'calls':>5} {'GMAC/call':>9} {'+attn mm':>8} "
          f"{'GMAC/run':>9} {'MAC ratio':>9} {'+attn mm':>8}")
    rows = {}
    for spec, m in methods.items():
        macs = [run_macs(unet, m.accel, m.calls, hw, mm, m.sigmas) for mm in (False, True)]
        rows[spec] = dict(calls=m.calls, gmacs_call=macs[0] / m.calls / 1e9, gmacs_call_mm=macs[1] / m.calls / 1e9,
                          gmacs_run=macs[0] / 1e9, macs_ratio=base[0] / macs[0], macs_ratio_mm=base[1] / macs[1])
        r = rows[spec]
        print(f"{spec:28} {m.calls:5} {r['gmacs_call']:9.1f} {r['gmacs_call_mm']:8.1f} {r['gmacs_run']:9.0f} "
              f"{ratio_text(r['macs_ratio'], 9)} {ratio_text(r['macs_ratio_mm'], 8)}")
    return rows


# token selection alone ------------------------------------------------------------------------

def selection_bench(args, device, dtype):
    """Per-block selection cost at the top level of the UNet (N = latent tokens, C = 320); refused before
    allocating where the official approach's N x N matrices (measured peak: 2.25 N x N per image) do not fit."""
    h, w = (args.H or 512) // 8, (args.W or 512) // 8
    need = 2.25 * 2 * args.batch * (h * w) ** 2 * dtype.itemsize
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else \
        kb("MemAvailable", "/proc/meminfo") if os.path.exists("/proc/meminfo") else math.inf   # CPU: Linux's figure
    if need > free:
        raise ValueError(f"--selection at {8 * h}x{8 * w}, --batch {args.batch} needs about {need / 2 ** 30:,.1f} GiB "
                         f"(N x N matrices, N = {h * w}), {free / 2 ** 30:,.1f} GiB are free: lower --H/--W or --batch")
    x = torch.randn(2 * args.batch, h * w, 320, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    dynamics = torch.rand(x.shape[0], h, w, device=device)
    rows = {}
    for ratio in (0.3, 0.5, 0.7):
        calls = {"official (N x N Gram)": lambda r=ratio: official_selection(x, (h, w), r, generator=g),
                 "sito (kept)": lambda r=ratio: SiTo().plan(x, (h, w), r, generator=g),
                 "sito (base)": lambda r=ratio: SiTo(recover_from="base").plan(x, (h, w), r, generator=g),
                 "dato (kept)": lambda r=ratio: DaTo().plan(x, (h, w), r, dynamics=dynamics, generator=g),
                 "tome": lambda r=ratio: ToMe().plan(x, (h, w), r, generator=g)}
        times = compare(calls, args.runs, args.warmup, device)
        rows[ratio] = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\nToken selection per block: N={h * w}, C=320, batch {x.shape[0]}, {args.dtype}, {device.type}; "
          f"median ms (ratio to the official approach)")
    names = list(next(iter(rows.values())))
    print(f"{'ratio':>6} " + " ".join(f"{n:>22}" for n in names))
    for ratio, r in rows.items():
        print(f"{ratio:6.1f} " + " ".join(f"{r[n] * 1e3:13.1f} ({r[n] / r[names[0]]:5.2f}x)" for n in names))
    return rows


def markdown(results):
    """docs/benchmarks.md's table: per method each backend's ms/call (min-max), s/run, speed-up; MACs, memory."""
    backends = list(results)
    head = " | ".join(f"{b} ms/call (min-max) | UNet s/run | speed-up" for b in backends)
    lines = [f"| method | {head} | GMAC/call | + attn mm | MAC ratio | peak MB ({' / '.join(backends)}) |",
             "|---" * (1 + 3 * len(backends) + 4) + "|"]
    for name, first in results[backends[0]].items():
        cells = []
        for b in backends:
            r = results[b][name]
            cells += [f"{r['call_ms']:.0f} ({r['call_min_ms']:.0f}–{r['call_max_ms']:.0f})", f"{r['run_s']:.1f}",
                      ratio_text(r["speedup"], 0).strip()]
        macs = ([f"{first['gmacs_call']:.1f}", f"{first['gmacs_call_mm']:.1f}", ratio_text(first["macs_ratio"], 0)]
                if "gmacs_run" in first else ["", "", ""])
        memory = " / ".join(f"{results[b][name]['peak_mb']:.0f}" for b in backends)
        lines.append(f"| {name} | " + " | ".join(cells + macs + [memory]) + " |")
    return "\n".join(lines) + "\n"


def check_output(flag, path, taken):
    """An output file that cannot be written, or exists, is refused now, not after minutes of timing."""
    full, folder = os.path.abspath(path), os.path.dirname(os.path.abspath(path))
    if (other := taken.setdefault(full, flag)) != flag:
        raise ValueError(f"{flag} {path!r} is also the {other} file: give each output its own path")
    why = ("is a folder" if os.path.isdir(full) else "exists (results are not written over)" if os.path.exists(full)
           else f"is in {folder!r}, which does not exist" if not os.path.isdir(folder) else None
           if os.access(folder, os.W_OK) else "is not writable")
    if why:
        raise ValueError(f"{flag} {path!r} {why}: choose another path")


def vae_factor(args):
    """The VAE factor before loading: the preset's, a checkpoint's stated one (lab's), else SD's (all detected)."""
    try:
        metadata = read_metadata(args.ckpt) if args.ckpt and os.path.isfile(args.ckpt) else {}
    except Exception:   # not a readable checkpoint: loading it says why
        metadata = {}
    stated = config_from_json(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else None
    return (stated or (ARCHITECTURES[0] if args.ckpt else architecture(args.model)[0])).vae.factor


def check_args(args):
    """Everything wrong with the command line, before weights or timing -> (device, dtype, methods, attentions)."""
    for flag, value, least in (("--runs", args.runs, 1), ("--warmup", args.warmup, 0), ("--batch", args.batch, 1)):
        if value < least:   # --threads: run_tool's set_threads
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if args.vs_diffusers and importlib.util.find_spec("diffusers") is None:
        raise ValueError("--vs-diffusers needs diffusers: pip install diffusers")
    if args.ckpt and not os.path.exists(args.ckpt):
        raise ValueError(f"--ckpt {args.ckpt!r} does not exist (a .safetensors/.ckpt file or a diffusers folder)")
    if args.macs_only and (args.ckpt or args.selection or args.e2e or args.vs_diffusers or args.plot or args.markdown):
        raise ValueError("--macs-only counts an architecture's MACs (--model) and times nothing: leave out --ckpt, "
                         "--selection, --e2e, --vs-diffusers, --plot and --markdown")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot draws with matplotlib: pip install -r requirements-eval.txt")
        from matplotlib.backend_bases import FigureCanvasBase
        kinds = FigureCanvasBase.get_supported_filetypes()
        ext = os.path.splitext(args.plot)[1][1:].lower()   # without one, matplotlib would write PATH.png
        if ext not in kinds:
            raise ValueError(f"--plot {args.plot!r}: give a picture file name matplotlib writes, such as speed.png "
                             f"({', '.join(kinds)})")
    taken = {}
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path == "":
            raise ValueError(f"{flag} is empty; name a file")
        if path and args.selection and flag != "--json":
            raise ValueError(f"{flag} shows the methods' results; --selection writes its own only with --json")
        if path:
            check_output(flag, path, taken)
    step = 16 if args.selection else vae_factor(args)
    for flag, side in (("--H", args.H), ("--W", args.W)):
        if side is not None and (side < 1 or side % step):
            raise ValueError(f"{flag} {side}: --H and --W must be positive multiples of {step} (" + (
                "--selection groups 2x2 latent cells of 8 pixels" if args.selection else
                f"the VAE factor of {args.ckpt or args.model}") + f"), e.g. {flag} {max(side // step, 1) * step}")
    dtype = resolve_dtype(args.dtype, device := check_device(args.device))
    if args.selection:
        if ignored := [f for f, v in (("--methods", args.methods), ("--attention", args.attention)) if v is not None]:
            raise ValueError(f"--selection times token selection alone, no method: leave out {', '.join(ignored)}")
        return device, dtype, {}, []
    attentions = [a.strip() for a in (args.attention or "sdpa").split(",")]
    if any(a not in ATTENTION_BACKENDS for a in attentions) or len(set(attentions)) < len(attentions):
        raise ValueError(f"--attention {args.attention}: give distinct backends from {', '.join(ATTENTION_BACKENDS)}")
    unet_calls(args.steps, args.sampler)   # the baseline's run, whatever --methods lists: --steps in range
    methods = parse_methods(DEFAULT_METHODS if args.methods is None else args.methods, args.sampler, args.steps)
    if args.plot and "baseline" not in methods:   # the plot shows speed-ups: time what they are against
        print("--plot: timing baseline too (the speed-ups are against it)")
        methods = {"baseline": parse_run_method("baseline", args.sampler, args.steps), **methods}
    return device, dtype, methods, attentions


def run(args):
    device, dtype, methods, attentions = check_args(args)
    results = {"args": vars(args), "device": str(device), "dtype": dtype_name(dtype),
               "cpu": cpu_description() if device.type == "cpu" else None}
    if args.selection:
        with torch.inference_mode():
            results["selection"] = selection_bench(args, device, dtype)
    elif args.macs_only:
        results["macs"] = macs_table(args, methods)
    else:
        torch.manual_seed(0)
        if args.ckpt:
            sd = load_checkpoint(args.ckpt, device=device, dtype=dtype)
            config, unet = sd.config, sd.unet
        elif args.e2e:   # a tokenizer whose ids fit the model's vocabulary (the lab model's is 564 ids)
            config, tokenizer = architecture(args.model)
            sd = random_weights(config, device=device, dtype=dtype, tokenizer=tokenizer, name=args.model)
            config, unet = sd.config, sd.unet
        else:   # timing the UNet needs the UNet only
            config = architecture(args.model)[0]
            unet = random_unet(config, device, dtype)
        args.H, args.W = check_size(config, (args.H, args.W))
        if args.e2e:   # its tokenizer now, not after the timing: a missing one ends the run before it starts
            sd.text.tokenize(["a red cube on a table"])
        results["methods"], compiled = {}, None
        for attention in attentions:
            unets = {"eager": unet}
            if args.compile:   # the same kinds on a compiled copy, timed in turn with the eager ones
                compiled = unets["compiled"] = compiled or compile_unet(copy.deepcopy(unet))
            tables, warm = bench_methods(args, unets, config, methods, attention, device, dtype, args.vs_diffusers)
            rows = tables["eager"]
            if args.e2e:
                add_e2e(rows, sd, methods, args, attention, device)
            print_rows(rows, args, f"{attention} attention", device, dtype)
            results["methods"][attention] = rows
            if compiled is not None:   # its speed-ups against the compiled baseline
                for spec, row in tables["compiled"].items():
                    row["vs_eager"] = rows[spec]["run_s"] / row["run_s"]
                print_rows(tables["compiled"], args, f"{attention} attention, compiled", device, dtype)
                w = warm["compiled"]
                print(f"compiled (model/compile.py, inductor): first calls of every kind {w['seconds']:.0f}s, "
                      f"{w['graphs']} graphs compiled, {w['graphs_after']} after them")
                results["methods"][f"{attention} compiled"] = tables["compiled"]
                results.setdefault("compile", {})[attention] = w
    if args.json:   # the files in order of what they keep: the plot, drawn last, keeps least
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown and "methods" in results:
        with open(args.markdown, "w") as f:
            f.write(markdown(results["methods"]))
    if args.plot and "methods" in results:
        draw_speedups(results["methods"], args.plot)


def main(argv=None):
    p = Parser(prog="python -m tools.bench", description=__doc__)
    p.add_argument("--model", choices=RANDOM_ARCHITECTURES, default="sd1",
                   help="architecture with random weights (sd1)")
    p.add_argument("--ckpt", help="time a real checkpoint instead of random weights")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="precision (auto: see above)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the best available)")
    p.add_argument("--attention", help=f"comma-separated backends from {', '.join(ATTENTION_BACKENDS)} (sdpa)")
    p.add_argument("--methods", help=f"comma-separated: {method_syntax()} (default: {DEFAULT_METHODS})")
    p.add_argument("--H", type=int, help="pixels, a multiple of the VAE factor (default: the model's size; 512 "
                                         "for --selection, a multiple of 16)")
    p.add_argument("--W", type=int, help="pixels (as --H)")
    p.add_argument("--batch", type=int, default=1, help="images per call; CFG doubles it (1)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps: the run the per-call times compose (50)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="plms", help=f"{', '.join(SAMPLERS)} (plms)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per call kind, the median is reported (5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (1)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--vs-diffusers", action="store_true", help="also time diffusers' UNet2DConditionModel")
    p.add_argument("--e2e", action="store_true", help="also time one real sampling run per method")
    p.add_argument("--compile", action="store_true", help="also time every method on the UNet with its layers "
                   "compiled (model/compile.py), against the compiled baseline (a column per backend)")
    p.add_argument("--selection", action="store_true", help="time token selection alone (no UNet)")
    p.add_argument("--macs-only", action="store_true", help="only the analytic MACs of each method (no timing: "
                   "instant at any size)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="draw the speed-ups into this PNG")
    p.add_argument("--markdown", help="write the results table (the format of docs/benchmarks.md) to this file")
    run_tool(p, run, argv, "interrupted: no results written", flags={"batch_size": "--batch"})   # bad input: 1 line


if __name__ == "__main__":
    main()
