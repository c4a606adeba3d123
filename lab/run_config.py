"""The settings of a lab.train run: the recipe (TrainConfig), the command line that sets it, and the run's
record, RUN/config.json, from which a resumed run takes its settings. Every check of a command runs here,
before anything is loaded, trained or written, and reports one line naming the flag and the fix; so does a
stage file (vae.pt, latents.pt, unet.pt, decoder.pt) that turns out unreadable as a stage restores itself (stage_file).
"""
import argparse
import contextlib
import json
import math
import os
import typing
import zipfile
from dataclasses import asdict, dataclass, fields, replace

import torch

from lab.cli import FolderError, path_flag, write_json
from model import load_checkpoint
from model.checkpoint import CONFIG_KEY, TOKENIZER_KEY, read_metadata
from model.config import SDConfig, TextConfig, UNetConfig, VAEConfig, config_from_json
from model.files import read_state_dict
from model.hardware import check_device, native_bf16_cpu
from model.text import TokenizerError
from sampler.cli import Parser

# The lab model's architecture: SD1's structure at 128 px with small widths and a factor-4 VAE, so a
# 128x128 image is a 4x32x32 latent and the top transformer blocks see 1024 tokens, as pruning
# expects; a compact tokenizer (lab/tokenizer) with 564 ids. The exported file carries this config
# in its metadata, which is how sample.py --random-weights lab finds it without lab/ code.
LAB = SDConfig(
    "sd1", "eps",
    UNetConfig(model_channels=32, head_channels=32, context_dim=128),
    VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
    TextConfig(width=128, layers=3, heads=4, mlp=512, vocab_size=564, max_length=16, bos_id=562,
               eos_id=563, pad_id=563),
    scale_factor=0.84134, image_size=128, guidance=4.0,   # 1 / std of the shipped VAE's latents
)

@dataclass(frozen=True)
class TrainConfig:
    """The recipe; defaults are the shipped model's (2 CPU cores: about 2 h in all)."""
    seed: int = 0
    vae_steps: int = 1000          # batches of vae_batch crops
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 4e-4
    kl_weight: float = 1e-6        # LDM's first-stage KL weight: latents stay near a Gaussian, detail survives
    latents: int = 24000           # scenes encoded once for the UNet ...
    pairs: float = 0.6             # ... this fraction of them two-object scenes (the harder kind)
    unet_minutes: float = 75.0     # UNet training time budget (wall clock, evaluation excluded) ...
    unet_steps: int | None = None  # ... or a number of steps (None: the time budget decides)
    batch: int = 64
    lr: float = 5e-4
    warmup: int = 200
    ema: float = 0.999
    min_snr: float = 5.0           # min-SNR-gamma loss weights (Hang et al., 2023)
    uncond: float = 0.1            # fraction of empty captions, for classifier-free guidance
    eval_minutes: float = 10.0
    eval_captions: int = 32        # fixed captions (their own seed) sampled with PLMS-eval_steps
    eval_steps: int = 25
    decoder_minutes: float = 65.0  # the decoder fine-tuned on whole scenes, encoder frozen: time budget ...
    decoder_steps: int | None = None   # ... or a number of steps (None: the time budget decides)
    decoder_batch: int = 8
    decoder_lr: float = 3e-4
    mse_weight: float = 10.0       # the decoder loss: pixel L1, plus this weight on pixel MSE ...
    edge_weight: float = 1.0       # ... and this one on the L1 of neighbour differences (edges)
    decoder_eval: int = 32         # held-out scenes whose reconstruction PSNR decoder.jsonl logs
    stage: str = "all"             # "all": every stage; "decoder": with --init, only that model's decoder


RECORD = "config.json"
# the TrainConfig fields the command line sets
FLAGS = ("unet_minutes", "batch", "latents", "eval_minutes", "decoder_minutes", "stage")
# May differ on --resume: how long the UNet or decoder trains, and how often it is evaluated (none changes a step).
# The latents and the batch size make the data and the batches already drawn: a change would make another run.
ADJUSTABLE = ("unet_minutes", "eval_minutes", "decoder_minutes")
STAGES = ("all", "decoder")
MADE_FROM = {"vae.pt": None, "latents.pt": "vae.pt", "unet.pt": "latents.pt", "decoder.pt": "vae.pt"}
STAGE_FILES = tuple(MADE_FROM)   # the stages' checkpoints, each made from the one MADE_FROM names


def flag(field):
    return "--" + field.replace("_", "-")


def positive(kind):
    """An argparse type: a finite `kind` above 0, else argparse's one line naming the flag."""
    def parse(text):
        value = kind(text)   # not a number: argparse says "invalid int value"
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def parser(description):
    p = Parser(prog="python -m lab.train", description=description)
    p.add_argument("--out", default="runs/lab", type=path_flag,
                   help="folder for checkpoints, logs and pictures (runs/lab): new, empty or a run's")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings in its config.json")
    p.add_argument("--unet-minutes", type=positive(float),
                   help=f"UNet training budget in minutes ({TrainConfig.unet_minutes:g}); with --resume, a new total: "
                        "train longer")
    p.add_argument("--batch", type=positive(int), help=f"UNet batch size ({TrainConfig.batch}; 256 on a GPU); "
                                                         "fixed for a run")
    p.add_argument("--latents", type=positive(int), help=f"scenes encoded for the UNet ({TrainConfig.latents}); "
                                                         "fixed for a run")
    p.add_argument("--eval-minutes", type=positive(float), help=f"training minutes between checker evaluations "
                                                                f"({TrainConfig.eval_minutes:g}); with --resume, "
                                                                "from the next evaluation on")
    p.add_argument("--stage", choices=STAGES,
                   help="all (default): every stage; decoder: with --init, fine-tune only that model's VAE decoder "
                        "(its UNet, text encoder and encoder stay as they are); fixed for a run")
    p.add_argument("--decoder-minutes", type=positive(float),
                   help=f"decoder fine-tuning budget in minutes ({TrainConfig.decoder_minutes:g}); with --resume, "
                        "a new total")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--compile", action="store_true",
                   help="train the UNet through torch.compile: steps 1.26x faster on a 2-core CPU after about 5 "
                        "minutes of compiling, so worth it for runs longer than about 25 minutes")
    p.add_argument("--threads", type=positive(int),
                   help="torch threads (default: torch's; give a background run its share)")
    p.add_argument("--export", metavar="FILE", type=path_flag,
                   help="write the trained model to FILE (.safetensors, a new file) and stop")
    p.add_argument("--init", metavar="FILE", type=path_flag,
                   help="start from a shipped model (e.g. lab/lab-sd.safetensors): its VAE is kept, its UNet and "
                        "text encoder train on")
    return p


def prepare(p, args):
    """Every check of a training command, then its record written -> (TrainConfig, init, device)."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; choose a folder")
    check_own_folder(p, args.out)
    cfg, init = settings(p, args)
    if cfg.stage == "decoder" and init is None:
        p.error("--stage decoder fine-tunes a trained model's decoder: give it with --init FILE "
                "(e.g. --init lab/lab-sd.safetensors)")
    unused = [flag(name) for name in ("unet_minutes", "batch", "latents", "eval_minutes", "compile")
              if getattr(args, name) not in (None, False)]
    if cfg.stage == "decoder" and unused:
        p.error(f"--stage decoder trains the decoder alone: drop {', '.join(unused)}, which set the UNet stage")
    if cfg.stage == "all" and init is not None and args.decoder_minutes is not None:
        p.error("--decoder-minutes: a run continued with --init keeps its model's decoder; fine-tune that in a run "
                "of its own (--stage decoder)")
    if args.resume:
        check_stage_files(p, args.out)
    if init is not None:
        check_init(p, init)
    try:
        device = check_device(args.device)
    except ValueError as e:   # it names the device; the command line, its flag
        p.error(f"--{e}")
    try:
        write_record(args.out, cfg, init)
    except OSError as e:
        p.error(f"--out {args.out}: cannot write there ({e.strerror or e}); choose a folder you can write to")
    return cfg, init, device


def settings(p, args):
    """(TrainConfig, init) of the command: a new run's from its flags and the defaults, a resumed run's from its
    record with only ADJUSTABLE flags changing it. A flag repeating the recorded value is accepted, so the
    command that started a run, with --resume, continues it."""
    given = {field: getattr(args, field) for field in FLAGS if getattr(args, field) is not None}
    recorded = read_record(p, args.out, args.init)
    if recorded is None:
        if args.resume:
            p.error(f"--resume: {args.out} holds no run (no {RECORD}); drop --resume to start one there")
        return replace(TrainConfig(), **given), args.init
    if not args.resume:
        p.error(f"{args.out} holds a run; pass --resume to continue it, or choose another --out")
    cfg, init = recorded
    for field, value in given.items():
        if field not in ADJUSTABLE and value != getattr(cfg, field):
            p.error(f"{flag(field)} {shown(value)}: {args.out} was started with {flag(field)} "
                    f"{shown(getattr(cfg, field))}; "
                    f"drop {flag(field)} to resume it, or start a new run in another --out")
    if args.init is not None and (init is None or os.path.abspath(args.init) != os.path.abspath(init)):
        started = f"from {init}" if init else "without --init"
        p.error(f"--init {args.init}: {args.out} was started {started}; drop --init to resume it, "
                "or start a new run in another --out")
    return replace(cfg, **given), init


def shown(value):
    return f"{value:g}" if isinstance(value, (int, float)) else value


def check_own_folder(p, out):
    """--out must be new, empty or a run of lab.train (it holds config.json): a run's files (vae.pt, ...) are
    written over as it goes, so never into a folder of other files."""
    try:
        foreign = os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, RECORD))
    except OSError as e:
        p.error(f"--out {out} cannot be read ({e.strerror}); choose a folder you can write to")
    if foreign:
        p.error(f"--out {out} holds other files and no {RECORD}, so it is no lab.train run; choose a new or empty "
                "folder (nothing is written over)")


def read_record(p, out, given_init):
    """(TrainConfig, init) recorded in out/config.json, or None where out holds no run. A record written before
    runs recorded --init takes the command's."""
    path = os.path.join(out, RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        init = record.pop("init", given_init)
        cfg = TrainConfig(**record)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        p.error(f"{path} is not a lab.train run record ({e}); choose another --out")
    if cfg.stage not in STAGES:   # before the types: a stage is no path
        p.error(f"{path}: 'stage' is {json.dumps(cfg.stage)}, not one of {', '.join(STAGES)}; correct it in {RECORD} "
                "(or choose another --out)")
    for name, value, kinds in (*((f.name, getattr(cfg, f.name), f.type) for f in fields(TrainConfig)),
                               ("init", init, str | None)):
        if not of_type(value, kinds):   # an edited record: "5" for 5 would fail deep in a stage
            p.error(f"{path}: {name!r} is {json.dumps(value)}, not {type_name(kinds)}; correct it in {RECORD} "
                    "(or choose another --out)")
    return cfg, init


def of_type(value, annotation):
    """Whether a recorded value is of a TrainConfig field's annotated type (an int is a float; a bool, JSON's
    true, is no number)."""
    kinds = typing.get_args(annotation) or (annotation,)
    kinds = (*kinds, int) if float in kinds else kinds
    return isinstance(value, kinds) and not isinstance(value, bool)


def type_name(annotation):
    names = {int: "an integer", float: "a number", str: "a path", type(None): "null"}
    return " or ".join(names[kind] for kind in typing.get_args(annotation) or (annotation,))


def write_record(out, cfg, init):
    """out/config.json: the recipe and the model the run started from (None: from nothing), atomically."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, RECORD)
    write_json(path, {**asdict(cfg), "init": init})


def check_init(p, path):
    """--init FILE must be a whole lab model with its tokenizer beside it, as --export writes one: checked by
    loading it (under a second on a CPU)."""
    try:
        read_state_dict(path)   # missing, damaged, not weights: its own line says which
        metadata = read_metadata(path)
        if CONFIG_KEY not in metadata:
            raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata, so it is no model that --export wrote")
        if replace(config_from_json(metadata[CONFIG_KEY]), scale_factor=LAB.scale_factor) != LAB:
            raise ValueError(f"{path} is not of the lab architecture (lab.run_config.LAB)")
        tokenizer = os.path.join(os.path.dirname(os.path.abspath(path)), metadata.get(TOKENIZER_KEY, "tokenizer"))
        if not all(os.path.isfile(os.path.join(tokenizer, name)) for name in ("vocab.json", "merges.txt")):
            raise ValueError(f"{path} has no tokenizer beside it ({tokenizer}/ with vocab.json and merges.txt), "
                             "whose token ids its text encoder learned")
        load_checkpoint(path, tokenizer=tokenizer)   # every key and shape, and a usable tokenizer
    except (ValueError, TokenizerError) as e:
        p.error(f"--init: {e}; --init takes a lab model written by --export (e.g. lab/lab-sd.safetensors)")


def check_export(p, args):
    """--export FILE writes a run's model and stops, so it takes no training flags; FILE is a new .safetensors
    (an export never overwrites one) and --out a run trained up to its UNet stage (a --stage decoder run: up to
    its decoder stage, with its --init file still there)."""
    training = [flag(name) for name in (*FLAGS, "resume", "init", "compile")
                if getattr(args, name) not in (None, False)]
    if training:
        p.error(f"--export writes a trained run's model and stops: drop {', '.join(training)} (or train first, "
                "without --export)")
    path = args.export
    if not path.lower().endswith(".safetensors"):
        p.error(f"--export {path}: the name must end in .safetensors, the format written (loaders go by it)")
    if os.path.exists(path):
        beside = path[:-len(".safetensors")] + "-new.safetensors"
        p.error(f"--export {path} exists, and an export never overwrites one; export beside it "
                f"(--export {beside}), check it, then move it over: mv {beside} {path}")
    recorded = read_record(p, args.out, None)
    decoder_run = recorded is not None and recorded[0].stage == "decoder"
    needed = ("tokenizer", "vae.pt", "decoder.pt") if decoder_run else ("tokenizer", "vae.pt", "latents.pt", "unet.pt")
    missing = [name for name in needed if not os.path.exists(os.path.join(args.out, name))]
    if missing:
        up_to = "its decoder stage" if decoder_run else "its UNet stage"
        p.error(f"--export: {args.out} holds no run trained up to {up_to} (no {', '.join(missing)}); "
                "name the run's folder with --out")
    if decoder_run and not os.path.isfile(recorded[1]):
        p.error(f"--export: {args.out} fine-tuned the decoder of {recorded[1]}, which is gone, and its other "
                "tensors come from there; put it back")
    check_stage_files(p, args.out)


def stage_error(path, why):
    """A stage file that cannot be used: one line naming it, and the fix, to make it again (and the later
    stages' files, made from it, with it)."""
    out, name = os.path.split(path)
    later = [n for n in STAGE_FILES if n != name and name in upstream(n) and os.path.exists(os.path.join(out, n))]
    also = f" with {' and '.join(later)}, made from it," if later else ""
    return FolderError(f"{path} cannot be read as lab.train's checkpoint ({why}); delete it{also} and rerun with "
                       f"--resume (--out {out}) to make {'them' if later else 'it'} again")


def upstream(name):
    """The stage files `name` was made from, directly or not."""
    source = MADE_FROM[name]
    return [] if source is None else [source, *upstream(source)]


def check_stage_files(p, out):
    """Each stage file in `out` must be whole, checked before any stage runs: torch.save writes a zip whose index
    comes last, so a truncated, empty or foreign file has none (checking costs no load)."""
    for name in STAGE_FILES:
        path = os.path.join(out, name)
        if os.path.isfile(path) and not zipfile.is_zipfile(path):
            p.error(str(stage_error(path, "not a whole torch file: truncated, empty or another program's")))


@contextlib.contextmanager
def stage_file(path):
    """The contents of the stage file `path`, for a stage to restore itself from: whatever fails in reading or
    restoring (a torch file of another program, of other shapes) ends in stage_error's one line, no traceback."""
    try:
        yield torch.load(path, map_location="cpu")
    except FolderError:   # an earlier stage's file, read within (export reads the VAE's while the UNet's is open)
        raise
    except Exception as e:   # torch.load and load_state_dict fail in many types: UnpicklingError, KeyError, ...
        first = str(e).strip().splitlines()[:1]
        raise stage_error(path, ": ".join([type(e).__name__, *(line[:160] for line in first)])) from None


def save(state, path):
    """Write a stage file atomically: an interrupted save never leaves a half-written checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def autocast(device):
    """Training's precision: bf16 autocast on GPUs and on CPUs with native bf16 units, else fp32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda" or native_bf16_cpu())
