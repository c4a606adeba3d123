"""Quality beside speed for a list of acceleration methods, measured on the same images.

    python -m tools.evaluate --ckpt lab/lab-sd.safetensors --methods baseline,sito:0.5,dato-coco --n 256 --out runs/q
    torchrun --nproc-per-node 8 -m tools.evaluate --ckpt v1-5-pruned-emaonly.safetensors --prompts coco.txt \
        --methods baseline,dato-coco --inception pt_inception-2015-12-05-6726825d.pth --fid-ref coco_val.npz \
        --clip openai/clip-vit-large-patch14 --out runs/coco

Methods use bench.py's syntax (baseline, tome:R, sito:R, dato:R, todo:F, the presets of accel/,
schedule files), each on the command's --sampler/--steps or on its own run: SPEC@SAMPLER:STEPS
(baseline@dpmpp-2m:20, deepcache-n3@dpmpp-2m:25); a schedule file keeps the run it records. The
command's run ("baseline") is the reference of every vs-baseline metric, of mac_ratio and of speedup.
Prompts: --prompts FILE (one per line), or else --n captions of the lab's scene sampler (lab/scenes.py),
drawn with --seed. A file that mixes lab captions with other lines is refused, naming the first other one
(as lab.check refuses such a captions.txt): accuracy and lab FD need every prompt to be a lab caption.
Image k has prompt k and noise seed --seed + k, rendered in the fixed batch k // --batch-size: the same image
in every method folder, run and number of processes (a batch's noise and token choices follow its first
seed). Sampling flags and defaults are sample.py's.

Output, in --out:
    settings.json              what the images depend on; a later run with other settings is refused
    <method>/NNNNN.png         image k of each method (the spec made file-safe: sito:0.5 -> sito_0.5)
    <method>/settings.json     the method's acceleration; a spec that now means another one is refused
    timing.json                UNet seconds per image, per method and batch, with the run that measured them
    results.json, results.md   the metrics below, per method
    grid.png                   methods (rows) x the first prompts (columns)
    quality_vs_speed.png       quality (lab accuracy, else FID, else PSNR) against MAC ratio

Metrics (metrics.py says what each is and where its weights come from): `accuracy` by the lab checker
(lab captions), `fd_lab` and `fd_lab_vs_baseline` in the lab feature network's space (lab captions),
`vs_baseline` (McNemar's exact test of the checker's verdicts against the baseline's on the same images),
`fid` / `fid_vs_baseline` (--inception), `clip_score` (--clip), `psnr`, `ssim` and `lpips` (--lpips)
against the baseline image of the same prompt and seed (these need baseline among the methods);
`mac_ratio` = baseline UNet MACs / the method's over a run (analytic, attention matmuls included, the
code bench.py uses); `speedup` = baseline UNet seconds per image / the method's (medians over batches),
when both were measured by the same run. A metric that does not apply is absent; missing weights stop the run first.

Sharding: with --workers K (or under torchrun) every process renders and scores the batches b with
b % processes == its rank and rank 0 combines them in batch order, so the files and metrics equal a
one-process run's; each process gets cores / processes torch threads unless --threads says otherwise.

Resume: the same command again renders only the missing images (a batch with one is rendered again, only its
missing files written, atomically: no partial file is left) and recomputes the metrics.
"""
import importlib.util
import json
import os
import statistics
import time
import uuid
from dataclasses import replace

import torch
from PIL import Image, ImageOps

from lab.features import SHIPPED as LAB_FEATURES_FILE
from lab.scenes import image_seed, render, sample_captions
from model.hardware import check_device, dtype_name, resolve_dtype
from prune import as_record, from_record
from sampler import SAMPLERS, unet_calls
from sampler.generate import Timer, check_size, generate, save_png
from tools.cli import (
    Parser,
    add_model_flags,
    add_sampling_flags,
    check_results_folder,
    claim_folder,
    load_model,
    read_prompts,
    resolve_run,
    run_tool,
    sampling,
    settings_record,
    write_json,
)
from tools.measure import cpu_description, run_macs
from tools.metrics import LPIPS_WEIGHTS, Scorer, check_captions, load_stats, markdown
from tools.plots import GRID_COLUMNS, draw_grid, draw_tradeoff
from tools.results import check_images, check_outputs, folder_name, image_path, read_timing
from tools.shard import Shard, add_worker_flag, run_workers, wants_workers
from tools.specs import parse_methods

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp")


def claim_methods(out, settings, methods):
    """Claim --out for these settings and each method's folder for its acceleration and run: a spec whose
    meaning changed (a schedule file rewritten, a preset redefined) is refused rather than served stale images."""
    claim_folder(out, settings, "images")
    for spec, m in methods.items():
        record = {"method": spec, "acceleration": json.loads(json.dumps(m.accel.record() if m.accel else None)),
                  "sampler": m.sampler, "steps": m.steps}
        folder = os.path.join(out, folder_name(spec))
        claim_folder(folder, record, "images", upgrade=upgrade_record)
        for name in os.listdir(folder):   # half-written images of a run that was killed (no process writes yet)
            if name.endswith(".png.tmp"):
                os.remove(os.path.join(folder, name))


def upgrade_record(stored):
    """A method folder's settings from before token methods were a registry (their pruning listed every
    method's fields) in today's form (prune.as_record), so that such a folder still resumes."""
    prune = (stored.get("acceleration") or {}).get("prune")
    if prune:
        try:
            stored["acceleration"]["prune"] = as_record(from_record(prune))
        except ValueError:   # not an older form of any settings: claim_folder reports the difference
            pass
    return stored


def method_sampling(args, method, **fields):
    """The Sampling of one method: the command's flags on the method's own sampler and steps (--eta only
    where that sampler takes it: the others are deterministic)."""
    eta = args.eta if SAMPLERS[method.sampler].takes_eta else 0.0
    return replace(sampling(args, **fields), sampler=method.sampler, steps=method.steps, eta=eta, accel=method.accel)


def draw_prompts(args):
    """The run's prompts: --prompts FILE (its first --n lines), else --n lab captions drawn with --seed."""
    if args.prompts:
        prompts = read_prompts(from_file=args.prompts, flag="--prompts")
        if args.n and args.n > len(prompts):
            raise ValueError(f"--n {args.n}: --prompts {args.prompts} holds {len(prompts)} prompts; lower --n or "
                             "leave it out (all of them)")
        prompts = prompts[:args.n] if args.n else prompts
        check_captions(prompts, f"--prompts {args.prompts}")
        return prompts
    return sample_captions(args.n or 256, seed=f"evaluate/{args.seed}")


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


def render_missing(sd, prompts, methods, args, out, device, shard):
    """Render every missing image of this process's batches, each batch for every method in turn (so the
    methods' timings see the same machine load). -> {spec: {batch start: UNet seconds per image}}."""
    seconds = {spec: {} for spec in methods}
    n, size = len(prompts), args.batch_size
    if args.compile:   # compile each method's call kinds on an untimed batch, so its timed batches run compiled
        for spec, method in methods.items():
            if any(not is_whole(image_path(out, spec, k)) for k in range(n)):
                begin = time.perf_counter()
                generate(sd, prompts[:size], method_sampling(args, method, seed=args.seed, batch_size=size))
                print(f"{shard.tag}{spec}: compile and warm-up {time.perf_counter() - begin:.1f}s (untimed)",
                      flush=True)
    for start in shard.mine(range(0, n, size)):
        stop = min(start + size, n)
        for spec, method in methods.items():
            todo = [k for k in range(start, stop) if not is_whole(image_path(out, spec, k))]
            if not todo:
                continue
            timer = Timer(device)
            images = generate(sd, prompts[start:stop], method_sampling(args, method, seed=(args.seed + start) % 2 ** 64,
                                                                       batch_size=size), timer=timer)
            seconds[spec][start] = timer.totals["unet"] / len(images)
            for k in todo:
                write_image(images[k - start], image_path(out, spec, k))
            print(f"{shard.tag}{spec}: images {start}-{stop - 1} ({timer.totals['unet']:.1f}s UNet)", flush=True)
    return seconds


def update_timing(out, seconds, run_id, device):
    """timing.json: per method and batch (its first image's index), the UNet seconds per image of every
    run that rendered it, oldest first, with the run's id and machine. A rerun that repairs a few
    images adds to their batches and keeps what the first run measured.
    -> {spec: {batch: [{"run", "device", "seconds_per_image"}, ...]}}."""
    path = os.path.join(out, "timing.json")
    timing = read_timing(path)   # run() checked it before the rendering: a damaged file fails there, not here
    machine = cpu_description() if device.type == "cpu" else torch.cuda.get_device_name(device)
    for spec, batches in seconds.items():
        for start, value in batches.items():
            timing.setdefault(spec, {}).setdefault(str(start), []).append(
                {"run": run_id, "device": machine, "seconds_per_image": value})
    write_json(path, timing)
    return timing


def speedup(timing, spec):
    """Baseline UNet seconds per image over the method's, medians over the batches that one run timed for
    both (the latest such run of each batch: timings from different runs are not comparable on a noisy
    machine); None without such batches."""
    base, ours, pairs = timing.get("baseline", {}), timing.get(spec, {}), []
    for batch in base.keys() & ours.keys():
        runs = {t["run"]: t["seconds_per_image"] for t in base[batch]}
        if common := [(runs[t["run"]], t["seconds_per_image"]) for t in ours[batch] if t["run"] in runs]:
            pairs.append(common[-1])
    if not pairs:
        return None
    return statistics.median(b for b, _ in pairs) / statistics.median(o for _, o in pairs)


def load_images(paths, size=None):
    """PIL RGB images; with `size` (W, H), centre-cropped to its aspect and resized (reference photos)."""
    images = [Image.open(path).convert("RGB") for path in paths]
    return [ImageOps.fit(im, size, Image.Resampling.LANCZOS) if size and im.size != size else im
            for im in images]


def reference_files(folder):
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_TYPES))
    if len(names) < 2:
        raise ValueError(f"--fid-ref {folder!r} holds {len(names)} images ({', '.join(IMAGE_TYPES)}); a Fréchet "
                         "distance needs at least 2 (thousands for a stable one)")
    return [os.path.join(folder, name) for name in names]


def check_reference(args, scorer):
    """Fail at start on a --fid-ref that cannot serve; -> reference statistics of a stats file, or None."""
    if not args.fid_ref:
        return None
    if not scorer.features:
        raise ValueError("--fid-ref needs a feature network: --inception FILE (or lab captions with --lab-features)")
    if os.path.isdir(args.fid_ref):
        check_images(reference_files(args.fid_ref), f"--fid-ref {args.fid_ref}")
        return None
    if not os.path.isfile(args.fid_ref):
        raise ValueError(f"--fid-ref {args.fid_ref!r} does not exist (a folder of images or an .npz of mu, sigma)")
    name, mu, sigma = load_stats(args.fid_ref, {name: net.num_features for name, net in scorer.features.items()})
    return {name: (mu, sigma)}


def reference_features(scorer, args, prompts, shard, stats, size):
    """{feature name: reference features in batch order, or (mu, sigma)} on rank 0: --fid-ref's images or
    statistics, else, for lab captions, the lab generator's own scenes for the same captions (its "real"
    images). None when there is no reference."""
    if stats is not None or not scorer.features:
        return stats
    if args.fid_ref:
        files = reference_files(args.fid_ref)
        parts = shard.batches(len(files), args.batch_size,
                              lambda a, b: scorer.features_of(load_images(files[a:b], size)))
    elif scorer.lab:
        parts = shard.batches(len(prompts), args.batch_size, lambda a, b: scorer.features_of(
            [render(prompts[k], image_seed(f"evaluate/{args.seed}", k)) for k in range(a, b)]))
    else:
        return None
    return None if parts is None else {name: [part[name] for part in parts] for name in scorer.features}


def method_macs(unet, method, hw, paths):
    """Analytic UNet MACs per image of a method's run (attention matmuls included); with adaptive guidance
    the mean over its images, each as far as it was guided (the call its PNG records it stopped at)."""
    stopped = [-1]
    if method.accel is not None and method.accel.guidance is not None and method.accel.guidance.stop:
        stopped = []
        for path in paths:
            with Image.open(path) as image:
                stopped.append(json.loads(image.info["parameters"])["guidance_stopped_at"])
    macs = {s: run_macs(unet, method.accel, method.calls, hw, matmuls=True, sigmas=method.sigmas, stopped_at=s)
            for s in set(stopped)}
    return sum(macs[s] for s in stopped) / len(stopped)


def measure(sd, scorer, prompts, methods, args, shard, timing, stats):
    """results.json's "methods" entry for every method, on rank 0 (None on the others). Every process
    scores its batches, one method at a time (memory: one method's features, not all of them). The
    command's own run (--sampler at --steps; the method "baseline") is the reference of mac_ratio and
    of every comparison with the baseline, whatever run a method has."""
    n, size, out = len(prompts), args.batch_size, args.out
    image_size, calls = check_size(sd.config, sampling(args).size), unet_calls(args.steps, args.sampler)   # (H, W)
    reference = reference_features(scorer, args, prompts, shard, stats, image_size[::-1])   # PIL sizes: (W, H)
    hw = tuple(side // sd.config.vae.factor for side in image_size)
    base_macs = run_macs(sd.unet, None, calls, hw, matmuls=True)   # attention matmuls: what pruning saves most
    with_baseline = "baseline" in methods
    results, baseline, baseline_correct = {}, None, None
    for spec in sorted(methods, key=lambda spec: spec != "baseline"):   # the baseline's features first
        def work(a, b, spec=spec):
            paths = [image_path(out, spec, k) for k in range(a, b)]
            base = None if spec == "baseline" or not with_baseline else \
                load_images([image_path(out, "baseline", k) for k in range(a, b)])
            return scorer.score(load_images(paths), prompts[a:b], base)
        parts = shard.batches(n, size, work)
        if parts is None:
            continue
        features = {name: [part["features"][name] for part in parts] for name in scorer.features}
        if spec == "baseline":
            baseline = features
            baseline_correct = [ok for part in parts for ok in part["correct"]] if scorer.lab else None
        m = methods[spec]
        entry = {"n": n, "sampler": m.sampler, "steps": m.steps,
                 "mac_ratio": base_macs / method_macs(sd.unet, m, hw, [image_path(out, spec, k) for k in range(n)])}
        others = (None, None) if spec == "baseline" else (baseline, baseline_correct)
        entry.update(scorer.summarize(parts, prompts, reference, *others))
        if (s := speedup(timing, spec)) is not None:
            entry["speedup"] = s
        results[spec] = entry
    return {spec: results[spec] for spec in methods} if shard.rank == 0 else None


def run(args):
    """Check everything, load the model once, render what is missing, measure, write the results."""
    resolve_run(args)
    methods = parse_methods(args.methods, args.sampler, args.steps)
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("evaluate.py plots with matplotlib: pip install -r requirements-eval.txt")
    prompts = draw_prompts(args)
    sampling(args, seed=args.seed)   # the seed and the sampling flags, before any heavy work
    check_results_folder(args.out)
    check_outputs(args.out, methods, len(prompts))
    shard = Shard.start(args)
    device = shard.device(check_device(args.device))
    scorer = Scorer.open(prompts, "baseline" in methods, lab_features=args.lab_features or None,
                         inception=args.inception, lpips=args.lpips, clip=args.clip, device=device)
    if scorer.features and len(prompts) < 2:
        raise ValueError(f"--n {len(prompts)}: the Fréchet distances ({', '.join(scorer.features)}) compare two sets "
                         "of images and need at least 2 of each; use --n 2 or more")
    stats = check_reference(args, scorer)
    if wants_workers(args):   # after the checks, so bad input is reported once, here
        return run_workers(run, args)
    dtype = resolve_dtype(args.dtype, device)
    sd = load_model(args, device, dtype)
    settings = settings_record(args, sd, prompts, dtype)
    shard.on_first(lambda: claim_methods(args.out, settings, methods))

    start, run_id = time.perf_counter(), shard.share(uuid.uuid4().hex)
    try:
        seconds = render_missing(sd, prompts, methods, args, args.out, device, shard)
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; rerun the same command to continue (finished images in {args.out}/ are kept)") \
            from None
    every = shard.gather(seconds)
    timing = None
    if shard.rank == 0:
        merged = {spec: dict(sorted((s, t) for part in every for s, t in part[spec].items())) for spec in methods}
        timing = update_timing(args.out, merged, run_id, device)
    results = measure(sd, scorer, prompts, methods, args, shard, timing, stats)
    if shard.rank != 0:
        return None
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"methods": results, "settings": settings}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results))
    first = {spec: load_images([image_path(args.out, spec, k) for k in range(min(GRID_COLUMNS, len(prompts)))])
             for spec in methods}
    draw_grid(first, prompts).save(os.path.join(args.out, "grid.png"))
    draw_tradeoff(results, methods, os.path.join(args.out, "quality_vs_speed.png"))
    print(markdown(results))
    print(f"{len(prompts)} prompts x {len(methods)} methods in {args.out}/  |  {dtype_name(dtype)} on {device}"
          f"{f' x {shard.world} processes' if shard.world > 1 else ''}  |  {time.perf_counter() - start:.0f}s")
    return results


def parser():
    p = Parser(prog="python -m tools.evaluate", description=__doc__)
    p.add_argument("--methods", default="baseline,sito:0.5,deepcache-n5,dato-coco",
                   help="comma-separated methods in bench.py's syntax (default: baseline,sito:0.5,deepcache-n5,"
                        "dato-coco)")
    p.add_argument("--n", "--num-prompts", dest="n", type=int,
                   help="number of prompts (default: 256 lab captions, or every line of --prompts); under torchrun "
                        "write --num-prompts: torchrun reads --n as an abbreviation of its own flags")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: lab captions)")
    p.add_argument("--seed", type=int, default=0, help="draws the lab captions; image k has noise seed seed + k (0)")
    p.add_argument("--batch-size", type=int, default=16, help="images per sampler batch, fixed per folder (16)")
    p.add_argument("--out", required=True, help="output folder (resumable: rerun the same command)")
    m = p.add_argument_group("metrics (weights that cannot be downloaded here come from these flags)")
    m.add_argument("--lab-features", metavar="FILE", default=LAB_FEATURES_FILE,
                   help="lab feature network for fd_lab, lab captions only ('' = off; default: the shipped one)")
    m.add_argument("--inception", metavar="FILE", help="FID Inception weights (torch-fidelity's "
                                                       "pt_inception-2015-12-05-6726825d.pth): fid, fid_vs_baseline")
    m.add_argument("--fid-ref", metavar="DIR|NPZ", help="reference images (a folder), or their statistics (.npz with "
                                                        "mu, sigma), for fid / fd_lab (lab default: the generator's "
                                                        "scenes for the same captions)")
    m.add_argument("--clip", metavar="DIR_OR_ID", help="CLIP model for clip_score (e.g. openai/clip-vit-large-patch14)")
    m.add_argument("--lpips", action="store_true", help=f"LPIPS (AlexNet) against the baseline; needs {LPIPS_WEIGHTS} "
                                                        "in torch's hub cache")
    add_worker_flag(p)
    add_sampling_flags(p)
    add_model_flags(p)
    return p


def main(argv=None):
    return run_tool(parser(), run, argv)


if __name__ == "__main__":
    main()
