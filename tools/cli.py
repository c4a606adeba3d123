"""The research tools' command-line kit (bench.py, evaluate.py, search.py): sampler/cli.py's, which sample.py is
made of (re-exported here), plus what only the tools need: results folders that resume and refuse other settings,
the record of the settings images depend on, JSON files, and leaving a torchrun process group at the end.
"""
import copy
import hashlib
import json
import os

from lab.cli import write_json  # noqa: F401  (shared with lab.*, re-exported)
from model.hardware import dtype_name
from sampler import cli as kit
from sampler.cli import (  # noqa: F401  (the generation API's command line, re-exported for the tools)
    RANDOM_ARCHITECTURES,
    Parser,
    add_model_flags,
    add_sampling_flags,
    architecture,
    load_model,
    parse_numbers,
    read_prompts,
    resolve_checkpoint,
    resolve_run,
    sampling,
)
from sampler.generate import check_outdir

from .shard import leave_group


def run_tool(p, run, argv=None, interrupted="interrupted", flags=None):
    """sampler.cli.run_tool (parse, --threads, run; bad input in one line), then leave the process group that
    `run` joined (torchrun)."""
    try:
        return kit.run_tool(p, run, argv, interrupted, flags)
    finally:
        leave_group()


def settings_record(args, sd, prompts, dtype):
    """What images rendered by these flags depend on, besides the method: the record claim_folder keeps.
    The weights are named by content (model.files.weights_id), not by path: a folder never resumes with
    other weights put at the same path."""
    run = sampling(args, seed=args.seed, batch_size=args.batch_size)
    return {"checkpoint": checkpoint_id(sd), "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "n": len(prompts), "seed": args.seed, "batch_size": args.batch_size, "steps": run.steps,
            "scale": sd.config.guidance if run.scale is None else run.scale, "sampler": run.sampler, "eta": run.eta,
            "size": list(run.size) if run.size else None, "dtype": dtype_name(dtype), "attention": run.attention,
            "negative_prompt": run.negative_prompt}


def checkpoint_id(sd):
    """The record's name of a model's weights: their content id, or "random weights: <preset>" (seeded)."""
    return sd.source if sd.source.startswith("random weights") else weights_id(sd.source)


def upgrade_checkpoint(stored, settings):
    """A folder recorded before weights were named by content holds the checkpoint's path: if the file now
    there holds the weights loaded today, it takes today's id and resumes as it did before (what was
    there when its images were made, nothing recorded)."""
    recorded, today = stored.get("checkpoint"), settings.get("checkpoint")
    if isinstance(recorded, str) and not recorded.startswith(("sha256:", "random weights")) and \
            os.path.exists(recorded) and today == weights_id(recorded):
        stored["checkpoint"] = today
    return stored


def check_results_folder(out, flag="--out"):
    """check_outdir, and an existing folder must already be this tool's (it holds settings.json) or be
    empty: results are never mixed into a folder of other files (a home folder, `/`)."""
    check_outdir(out, flag)
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "settings.json")):
        raise ValueError(f"{flag} {out!r} holds other files and no settings.json, so it is not a results folder "
                         f"of this tool; choose a new or empty {flag}")


def claim_folder(out, settings, what, upgrade=lambda stored: stored):
    """Write out/settings.json, or check that the `what` (images, evaluations) already in `out` were made
    with these settings: a resumed run never mixes results of different settings. `upgrade` rewrites the
    stored settings of an older version in today's form first."""
    path = os.path.join(out, "settings.json")
    if os.path.exists(path):
        recorded = read_json(path, None, f"it is {out}'s record of its {what}: choose another --out")
        stored = upgrade(upgrade_checkpoint(copy.deepcopy(recorded), settings))
        if stored != settings:
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise ValueError(f"{out!r} holds {what} made with other settings ({', '.join(changed)} differ); "
                             "choose another --out, or rerun with the same settings to resume")
        if recorded == settings:
            return
    os.makedirs(out, exist_ok=True)
    write_json(path, settings)   # first claim, or an older record in today's form


def read_json(path, key, fix):
    """The JSON object in `path`, which must hold `key` (None: any object); one line naming the file (and
    `fix`) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({str(e).splitlines()[0][:120]}); {fix}") from None
    if not isinstance(data, dict) or key is not None and key not in data:
        raise ValueError(f"{path} has no {key!r}, so it is not the file expected here; {fix}")
    return data


def repeat_flags(args):
    """The model and sampling flags that make another tool render as these flags do (those that differ
    from their defaults; --steps and --sampler always), for the commands a tool prints."""
    flags = ["--ckpt", args.ckpt] if args.ckpt else ["--random-weights", args.random_weights] \
        if args.random_weights else []   # neither: the same default ($SD_CKPT, else SD 1.5)
    for flag, value, default in (("--tokenizer", args.tokenizer, None), ("--prediction", args.prediction, None),
                                 ("--dtype", args.dtype, "auto"), ("--steps", args.steps, None),
                                 ("--sampler", args.sampler, None), ("--scale", args.scale, None),
                                 ("--H", args.H, None), ("--W", args.W, None), ("--eta", args.eta, 0.0),
                                 ("--attention", args.attention, "sdpa"),
                                 ("--negative-prompt", args.negative_prompt, "")):
        if value != default:
            flags += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def weights_id(path):
    """What the weights at `path` (a file, or a diffusers folder: every file in it) are, by content:
    "sha256:" and the SHA-256 of the bytes (with each file's place in a folder). A file replaced at the
    same path gets another id, the same file under another spelling the same one. Reads everything
    once (seconds for a 4 GB checkpoint), as loading does."""
    if not os.path.isdir(path):
        files = [(os.path.basename(path), path)]
    else:
        files = sorted((os.path.relpath(os.path.join(root, name), path), os.path.join(root, name))
                       for root, _, names in os.walk(path) for name in names)
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(f"{name if len(files) > 1 else ''}\0".encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"
