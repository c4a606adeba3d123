"""Quality beside speed for a list of acceleration methods, measured on the same images.

    python evaluate.py --ckpt lab/lab-sd.safetensors --methods baseline,sito:0.5,dato-coco --n 256 --out runs/q
    python evaluate.py --ckpt v1-5-pruned-emaonly.safetensors --prompts captions.txt --n 1000 \
        --methods baseline,dato-coco --out runs/coco

Methods use bench.py's syntax (baseline, tome:R, sito:R, dato:R, the presets of sampler/acceleration.py).
Prompts: --prompts FILE (one per line), or else --n captions of the lab's scene sampler (lab/scenes.py),
drawn with --seed. Image k has prompt k and noise seed --seed + k, rendered in the fixed batch
k // --batch-size, so it is the same image in every method folder and in every run (DDIM noise and
token choices follow the batch's first seed). Sampling flags and defaults are sample.py's.

Output, in --out:
    settings.json              what the images depend on; a later run with other settings is refused
    <method>/NNNNN.png         image k of each method (the spec made file-safe: sito:0.5 -> sito_0.5)
    timing.json                UNet seconds per image, per method, with the run that measured them
    results.json, results.md   the metrics below, per method
    grid.png                   methods (rows) x the first prompts (columns)
    quality_vs_speed.png       quality (lab accuracy, else PSNR) against MAC ratio

Metrics: `accuracy` by the lab checker (lab captions only; overall and per kind, with 95% bootstrap
intervals); `psnr` (dB) and `ssim` against the baseline image of the same prompt and seed (torchmetrics;
needs baseline among the methods); `mac_ratio` = baseline UNet MACs / the method's over a run
(analytic, attention matmuls included, the code bench.py uses); `speedup` = baseline UNet seconds per
image / the method's (medians over batches), when both were measured by the same process. A metric
that does not apply is absent. Not yet here: FID, CLIP score, LPIPS, sharding over processes.

Resume: rerunning the same command renders only the missing images (each batch with a missing image is
rendered again and only the missing files are written; images are written atomically, so an
interrupted run leaves no partial file) and recomputes the metrics.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import statistics
import time
import uuid

import torch
from PIL import Image, ImageDraw

from lab.check import check, summary
from lab.scenes import parse, sample_captions
from model.hardware import check_device, cpu_description, dtype_name, resolve_dtype
from sampler import unet_calls
from sampler.acceleration import PRESETS, check_preset_fits, parse_methods, run_macs
from sampler.cli import add_model_flags, add_sampling_flags, load_model, read_prompts, run_tool, sampling
from sampler.generate import Timer, check_outdir, check_seeds, from_pil, generate, save_png

INTERVAL_RESAMPLES = 2000


def folder_name(spec):
    """A method spec as a folder name: sito:0.5 -> sito_0.5."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", spec)


def draw_prompts(args):
    """The run's prompts: --prompts FILE (its first --n lines), else --n lab captions drawn with --seed."""
    if args.prompts:
        prompts = read_prompts(from_file=args.prompts, flag="--prompts")
        return prompts[:args.n] if args.n else prompts
    return sample_captions(args.n or 256, seed=f"evaluate/{args.seed}")


def is_lab(prompts):
    try:
        for prompt in prompts:
            parse(prompt)
    except ValueError:
        return False
    return True


def settings_record(args, sd, prompts, dtype):
    """What the images depend on (besides the method, which names its folder)."""
    run = sampling(args, seed=args.seed, batch_size=args.batch_size)
    return {"checkpoint": sd.source, "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "n": len(prompts), "seed": args.seed, "batch_size": args.batch_size, "steps": run.steps,
            "scale": sd.config.guidance if run.scale is None else run.scale, "sampler": run.sampler, "eta": run.eta,
            "size": list(run.size) if run.size else None, "dtype": dtype_name(dtype), "attention": run.attention,
            "negative_prompt": run.negative_prompt}


def claim_folder(out, settings):
    """Write settings.json, or check that the folder's images were made with these settings."""
    path = os.path.join(out, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored != settings:
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise ValueError(f"--out {out!r} holds images made with other settings ({', '.join(changed)} differ); "
                             "choose another --out, or rerun with the same settings to resume")
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)


def image_path(out, spec, k):
    return os.path.join(out, folder_name(spec), f"{k:05d}.png")


def is_whole(path):
    """An existing, readable PNG (a truncated or foreign file counts as missing: write_image replaces it)."""
    if not os.path.exists(path):
        return False
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        print(f"{path}: unreadable, rendering it again")
        return False


def write_image(image, path):
    """Atomically: the file at `path` is either absent or whole."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)   # left by a run that was killed while writing
    save_png(image, tmp)
    os.replace(tmp, path)


def render(sd, prompts, methods, args, out, device):
    """Render every missing image, batch by batch, each batch for every method in turn (so the methods'
    timings see the same machine load). -> {spec: [UNet seconds per image of each batch rendered]}."""
    seconds = {spec: [] for spec in methods}
    n, size = len(prompts), args.batch_size
    for spec in methods:
        os.makedirs(os.path.join(out, folder_name(spec)), exist_ok=True)
    for start in range(0, n, size):
        stop = min(start + size, n)
        for spec, accel in methods.items():
            todo = [k for k in range(start, stop) if not is_whole(image_path(out, spec, k))]
            if not todo:
                continue
            timer = Timer(device)
            images = generate(sd, prompts[start:stop],
                              sampling(args, seed=args.seed + start, accel=accel, batch_size=size), timer=timer)
            seconds[spec].append(timer.totals["unet"] / len(images))
            for k in todo:
                write_image(images[k - start], image_path(out, spec, k))
            print(f"{spec}: images {start}-{stop - 1} ({timer.totals['unet']:.1f}s UNet)", flush=True)
    return seconds


def update_timing(out, seconds, run_id, device):
    """timing.json keeps, per method, the per-image seconds of the last run that rendered any of its images."""
    path = os.path.join(out, "timing.json")
    timing = {}
    if os.path.exists(path):
        with open(path) as f:
            timing = json.load(f)
    machine = cpu_description() if device.type == "cpu" else torch.cuda.get_device_name(device)
    for spec, values in seconds.items():
        if values:
            timing[spec] = {"run": run_id, "device": machine, "unet_seconds_per_image": values}
    with open(path, "w") as f:
        json.dump(timing, f, indent=1)
    return timing


def bootstrap_interval(correct, seed=0):
    """95% percentile bootstrap interval of the mean of 0/1 outcomes."""
    values = torch.tensor(correct, dtype=torch.float64)
    picks = torch.randint(len(values), (INTERVAL_RESAMPLES, len(values)), generator=torch.Generator().manual_seed(seed))
    means = values[picks].mean(dim=1)
    return [means.quantile(0.025).item(), means.quantile(0.975).item()]


def lab_accuracy(images, prompts):
    rows = [{"caption": c, "correct": check(image, c).correct} for image, c in zip(images, prompts, strict=True)]
    report = summary(rows)
    result = {"accuracy": report["accuracy"], "accuracy_ci": bootstrap_interval([r["correct"] for r in rows])}
    result["by_kind"] = {}
    kinds = [parse(c).kind for c in prompts]
    for kind, entry in report["by_kind"].items():
        picked = [r["correct"] for r, k in zip(rows, kinds, strict=True) if k == kind]
        if picked:
            result["by_kind"][kind] = {**entry, "accuracy_ci": bootstrap_interval(picked)}
    result["by_relation"] = report["by_relation"]
    return result


def pixels(images):
    """PIL images -> [N, 3, H, W] floats in [0, 1]."""
    return from_pil(images).double() / 255


def fidelity(images, baseline):
    """Mean PSNR (dB) and SSIM of each image against the baseline image of the same prompt and seed
    (an identical image counts as 100 dB rather than infinity)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    x, y = pixels(images), pixels(baseline)
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(x.float(), y.float(), data_range=1.0, reduction="none")
    return {"psnr": psnr.clamp(max=100.0).mean().item(), "ssim": ssim.mean().item()}


def speedup(timing, spec):
    base, ours = timing.get("baseline"), timing.get(spec)
    if not base or not ours or base["run"] != ours["run"]:
        return None   # timings from different processes are not comparable on a noisy machine
    return statistics.median(base["unet_seconds_per_image"]) / statistics.median(ours["unet_seconds_per_image"])


def measure(sd, prompts, methods, out, timing, calls, hw):
    """results.json's "methods" entry for every method."""
    lab = is_lab(prompts)
    load = {spec: [Image.open(image_path(out, spec, k)).convert("RGB") for k in range(len(prompts))]
            for spec in methods}
    base_macs = run_macs(sd.unet, None, calls, hw, matmuls=True)   # attention matmuls: what pruning saves most
    results = {}
    for spec, accel in methods.items():
        entry = {"n": len(prompts), "mac_ratio": base_macs / run_macs(sd.unet, accel, calls, hw, matmuls=True)}
        if lab:
            entry.update(lab_accuracy(load[spec], prompts))
        if "baseline" in methods and spec != "baseline":
            entry.update(fidelity(load[spec], load["baseline"]))
        if (s := speedup(timing, spec)) is not None:
            entry["speedup"] = s
        results[spec] = entry
    return results, load


def markdown(results):
    columns = [("accuracy", "lab accuracy", "{:.1%}"), ("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
               ("mac_ratio", "MAC ratio", "{:.2f}x"), ("speedup", "speed-up", "{:.2f}x")]
    columns = [c for c in columns if any(c[0] in r for r in results.values())]
    lines = ["| method | " + " | ".join(c[1] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for spec, r in results.items():
        cells = []
        for key, _, form in columns:
            if key not in r:
                cells.append("-")
            elif key == "accuracy":
                lo, hi = r["accuracy_ci"]
                cells.append(f"{form.format(r[key])} ({lo:.1%}-{hi:.1%})")
            else:
                cells.append(form.format(r[key]))
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_grid(load, prompts, columns=6, side=128, band=24, label=110):
    """Methods as rows, the first prompts as columns, captions above."""
    columns = min(columns, len(prompts))
    sheet = Image.new("RGB", (label + columns * side, band + len(load) * side), "white")
    draw = ImageDraw.Draw(sheet)
    for j, prompt in enumerate(prompts[:columns]):
        words = prompt.split()
        draw.text((label + j * side + 2, 0), " ".join(words[:5]), fill="black")
        draw.text((label + j * side + 2, 11), " ".join(words[5:10]), fill="black")
    for i, (spec, images) in enumerate(load.items()):
        draw.text((4, band + i * side + side // 2 - 6), spec, fill="black")
        for j, image in enumerate(images[:columns]):
            sheet.paste(image.resize((side, side)), (label + j * side, band + i * side))
    return sheet


def draw_tradeoff(results, path, width=560, height=360):
    """Quality (lab accuracy with its interval, else PSNR) against MAC ratio, one point per method."""
    key = "accuracy" if all("accuracy" in r for r in results.values()) else "psnr"
    points = {spec: r for spec, r in results.items() if key in r}
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 50, width - 20, 15, height - 35
    if not points:
        image.save(path)
        return
    x_max = max(r["mac_ratio"] for r in points.values()) * 1.1
    values = [r[key] for r in points.values()]
    y_min, y_max = (0.0, 1.0) if key == "accuracy" else (math.floor(min(values)) - 1, math.ceil(max(values)) + 1)

    def xy(x, y):
        return (left + (x - 1) / max(x_max - 1, 1e-9) * (right - left),
                bottom - (y - y_min) / (y_max - y_min) * (bottom - top))
    draw.line((left, top, left, bottom, right, bottom), fill="black")
    for tick in range(1, math.floor(x_max) + 1):
        draw.text((xy(tick, y_min)[0] - 3, bottom + 2), f"{tick}x", fill="black")
    draw.text((right - 170, bottom + 18), "MAC ratio (baseline / method)", fill="black")
    draw.text((4, top), f"{y_max:g}", fill="black")
    draw.text((4, bottom - 10), f"{y_min:g}", fill="black")
    draw.text((left + 6, top), "lab accuracy (95% interval)" if key == "accuracy" else "PSNR vs baseline (dB)",
              fill="black")
    labels = []   # (x, y) of the labels drawn: a label that would overlap one moves down a line
    for spec, r in points.items():
        x, y = xy(r["mac_ratio"], r[key])
        if key == "accuracy":
            draw.line((*xy(r["mac_ratio"], r["accuracy_ci"][0]), *xy(r["mac_ratio"], r["accuracy_ci"][1])),
                      fill=(120, 120, 120))
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(200, 60, 40))
        ty = y - 6
        while any(abs(ty - ly) < 11 and abs(x - lx) < 90 for lx, ly in labels):
            ty += 11
        labels.append((x, ty))
        draw.text((x + 5, ty), spec, fill="black")
    image.save(path)


def check_methods(text, steps, sampler):
    calls = unet_calls(steps, sampler)
    for spec in text.split(","):
        if spec.strip() in PRESETS:
            check_preset_fits(spec.strip(), calls, sampler, steps)
    return parse_methods(text, calls), calls


def run(args):
    """Check everything, load the model once, render what is missing, measure, write the results."""
    methods, calls = check_methods(args.methods, args.steps, args.sampler)
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if "baseline" in methods and importlib.util.find_spec("torchmetrics") is None:
        raise ValueError("PSNR and SSIM against the baseline need torchmetrics: pip install -r requirements-eval.txt "
                         "(or leave baseline out of --methods)")
    prompts = draw_prompts(args)
    check_seeds(args.seed, len(prompts))
    check_outdir(args.out)
    device = check_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    sd = load_model(args, device, dtype)
    settings = settings_record(args, sd, prompts, dtype)
    claim_folder(args.out, settings)

    start, run_id = time.perf_counter(), uuid.uuid4().hex
    try:
        seconds = render(sd, prompts, methods, args, args.out, device)
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; rerun the same command to continue (finished images in {args.out}/ are kept)") \
            from None
    timing = update_timing(args.out, seconds, run_id, device)
    hw = tuple(side // sd.config.vae.factor for side in
               (settings["size"] or (sd.config.image_size, sd.config.image_size)))
    results, load = measure(sd, prompts, methods, args.out, timing, calls, hw)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"methods": results, "settings": settings}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results))
    draw_grid(load, prompts).save(os.path.join(args.out, "grid.png"))
    draw_tradeoff(results, os.path.join(args.out, "quality_vs_speed.png"))
    print(markdown(results))
    print(f"{len(prompts)} prompts x {len(methods)} methods in {args.out}/  |  {dtype_name(dtype)} on {device}  |  "
          f"{time.perf_counter() - start:.0f}s")
    return results


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="baseline,sito:0.5,deepcache-n5,dato-coco",
                   help="comma-separated methods in bench.py's syntax (default: baseline,sito:0.5,deepcache-n5,"
                        "dato-coco)")
    p.add_argument("--n", type=int, help="number of prompts (default: 256 lab captions, or every line of --prompts)")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: lab captions)")
    p.add_argument("--seed", type=int, default=0, help="draws the lab captions; image k has noise seed seed + k (0)")
    p.add_argument("--batch-size", type=int, default=16, help="images per sampler batch, fixed per folder (16)")
    p.add_argument("--out", required=True, help="output folder (resumable: rerun the same command)")
    add_sampling_flags(p)
    add_model_flags(p)
    return p


def main(argv=None):
    return run_tool(parser(), run, argv)


if __name__ == "__main__":
    main()
