"""The command line of the generation API, what sample.py is made of and the research tools
(tools/, lab/) build on: errors in one line (Parser, run_tool), the model and sampling flags, each
defined once with its default, and what they turn into, the loaded model and a Sampling.

    p = Parser(prog="my_tool.py")
    add_model_flags(p)
    add_sampling_flags(p)

    def run(args):
        sd = load_model(args, check_device(args.device), torch.float32)
        return generate(sd, ["a red circle"], sampling(args, seed=0, batch_size=16))

    run_tool(p, run)   # parse, set the threads, run; bad input ends in one line
"""
import argparse
import os
import signal
from dataclasses import replace

import torch

from model import MODELS, compile_unet, load_checkpoint, random_weights
from model.checkpoint import CONFIG_KEY, read_metadata
from model.config import PREDICTIONS, config_from_json
from model.hardware import DTYPE_CHOICES
from model.text import TokenizerError, byte_tokenizer, hub_unavailable
from model.unet import ATTENTION_BACKENDS

from .generate import Sampling
from .samplers import SAMPLERS
from .schedule import MAX_STEPS, SettingError

SD15 = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors")
# --sampler and --steps when neither they nor a schedule file say: the papers' PLMS-50
DEFAULT_RUN = ("plms", 50)
# the lab model's files, for --random-weights lab: found by path, so the CLI needs no lab/ code
LAB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab")
RANDOM_ARCHITECTURES = (*MODELS, "lab")   # what --random-weights builds
# the settings that the kit's own flags set, as an error about one names it (run_tool)
KIT_FLAGS = {"size": "--H/--W", "device": "--device", "dtype": "--dtype"}


class Parser(argparse.ArgumentParser):
    """argparse whose error is one line naming the flag (and where the help is), not the usage
    block first, as in git and pip. Help and usage stay argparse's, formatted as written."""

    def __init__(self, **kw):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def set_threads(p, args):
    """torch's CPU threads from --threads (None: torch's choice); refused unless 1 to the cores."""
    if args.threads is not None:
        cores = os.cpu_count() or 1
        if not 1 <= args.threads <= cores:   # far above, torch's thread pool segfaults at start
            p.error(f"--threads must be from 1 to this machine's {cores} CPU cores, "
                    f"got {args.threads}")
        torch.set_num_threads(args.threads)


def add_model_flags(p):
    p.add_argument("--ckpt", help=".safetensors / .ckpt file or diffusers folder "
                                  "(default: $SD_CKPT, else download SD 1.5)")
    p.add_argument("--random-weights", choices=RANDOM_ARCHITECTURES,
                   help="random weights of this architecture (offline test runs)")
    p.add_argument("--tokenizer", help="folder with vocab.json + merges.txt, or a hub id")
    p.add_argument("--prediction", choices=PREDICTIONS,
                   help="override the detected prediction type")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: the best available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="precision (default: auto = fp16 on GPUs, bf16 on CPUs with "
                        "AVX512-BF16/AMX, else fp32)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's choice; on a shared or small "
                        "machine fewer threads can be much faster)")
    p.add_argument("--compile", action="store_true", help="compile the UNet's layers "
                   "(model/compile.py): the first run with new settings compiles them (minutes on "
                   "a CPU), every later run and method reuses them")


def add_sampling_flags(p):
    p.add_argument("--negative-prompt", default="",
                   help="what to steer away from (default: the empty prompt)")
    # LDM's spellings (--ddim_steps, --ddim_eta) and diffusers' and A1111's (--num-inference-steps,
    # --guidance-scale, --cfg-scale, --height, --width) are accepted too
    p.add_argument("--steps", "--ddim_steps", "--num-inference-steps", type=int,
                   help=f"sampling steps, 1 to {MAX_STEPS} (default: a schedule file's, else "
                        f"{DEFAULT_RUN[1]}, the papers' PLMS-50, 51 UNet calls; 10-25 for dpmpp-2m "
                        "and unipc, 20-30 for euler)")
    p.add_argument("--scale", "--guidance-scale", "--cfg-scale", type=float,
                   help="guidance scale (default: the model's; 7.5 for SD1, 9.0 for SD2)")
    p.add_argument("--H", "--height", type=int, dest="H",
                   help="height in pixels, a multiple of the VAE factor, 8 for SD "
                        "(default: native)")
    p.add_argument("--W", "--width", type=int, dest="W",
                   help="width in pixels (default: the model's native size)")
    p.add_argument("--sampler", choices=list(SAMPLERS), metavar="{" + ",".join(SAMPLERS) + "}",
                   help="; ".join(f"{name}: {s.about}" for name, s in SAMPLERS.items())
                   + f" (default: a schedule file's, else {DEFAULT_RUN[0]}; "
                     "--plms is accepted as in LDM)")
    p.add_argument("--plms", action="store_true", help=argparse.SUPPRESS)   # LDM's --sampler plms
    p.add_argument("--eta", "--ddim_eta", type=float, default=0.0,
                   help="DDIM noise (default: 0 = deterministic; the other samplers need 0)")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa",
                   help="sdpa, or math: materialise the score matrix as the original LDM code did "
                        "(default: sdpa)")


def resolve_run(args, made_for=None):
    """Fill in --sampler and --steps where they were not given: from `made_for`, the (sampler,
    steps) a schedule file or preset was made for, else PLMS-50 (--plms: PLMS). -> a note of what
    was taken from `made_for`, for the run's summary ("" if nothing); flags that contradict it are
    refused later (check_preset_fits)."""
    if args.plms:
        if args.sampler not in (None, "plms"):
            raise ValueError(f"--plms and --sampler {args.sampler} contradict each other: "
                             "give one of them")
        args.sampler = "plms"
    taken = [flag for flag, dest in (("--sampler", "sampler"), ("--steps", "steps"))
             if getattr(args, dest) is None]
    sampler, steps = made_for or DEFAULT_RUN
    args.sampler = sampler if args.sampler is None else args.sampler
    args.steps = steps if args.steps is None else args.steps
    return (f"{' and '.join(taken)} from the preset ({sampler} {steps})" if taken and made_for
            else "")


def sampling(args, **fields):
    """The Sampling of the sampling flags; `fields` fill the rest (seed, accel, batch_size)."""
    size = None if args.H is None and args.W is None else (args.H, args.W)
    return Sampling(steps=args.steps, scale=args.scale, sampler=args.sampler, eta=args.eta,
                    size=size, attention=args.attention, negative_prompt=args.negative_prompt,
                    **fields)


def run_tool(p, run, argv=None, interrupted="interrupted", flags=None):
    """A tool's main: parse `argv`, set the threads, `run(args)`; bad input (arguments,
    checkpoint, schedule) ends in one line with the reason, Ctrl-C in the line `interrupted` (what
    to rerun). A bad setting is named by its flag: `flags` {setting: flag} where the flag is not
    --SETTING (sample.py's batch_size is --n-samples). The settings classes name the setting first
    (SettingError's name; prune/ and cache/, which import nothing of the project, as the first word
    of their ValueError's message)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)   # ends sample.py's start-up handler
    args = p.parse_args(argv)
    set_threads(p, args)
    flags = {**KIT_FLAGS, **(flags or {})}
    try:
        return run(args)
    except SettingError as e:
        p.error(f"{flags.get(e.name, '--' + e.name.replace('_', '-'))} {e.problem}")
    except ValueError as e:
        name, _, problem = str(e).partition(" ")
        p.error(f"{flags[name]} {problem}" if name in flags else str(e))
    except TokenizerError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(interrupted) from None


def resolve_checkpoint(ckpt):
    """--ckpt, else $SD_CKPT, else the official SD 1.5 single file from the hub (cached after the
    first download). Offline with nothing cached, one line at once: the hub's client would retry
    for half a minute."""
    if ckpt is not None:
        if not ckpt.strip():
            raise ValueError("--ckpt is empty: give a checkpoint path, or leave the flag out "
                             "($SD_CKPT, else SD 1.5)")
        return ckpt
    if env := os.environ.get("SD_CKPT"):
        if not os.path.exists(env):
            raise ValueError(f"SD_CKPT={env!r} does not exist (the checkpoint path came from the "
                             "SD_CKPT environment variable); fix SD_CKPT or pass --ckpt PATH")
        return env
    fix = ("pass --ckpt PATH (a .safetensors/.ckpt file or a diffusers folder; "
           "lab/lab-sd.safetensors works offline), or set SD_CKPT")
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        raise ValueError("no checkpoint given and huggingface_hub is not installed to fetch "
                         f"SD 1.5: {fix}") from None
    if isinstance(cached := try_to_load_from_cache(*SD15), str):
        return cached
    if hub_unavailable():   # the tokenizer's check: offline mode, or no connection within seconds
        raise ValueError("no checkpoint given, SD 1.5 is not cached, and the Hugging Face hub "
                         f"cannot be reached (offline?): {fix}")
    print(f"no --ckpt given and SD_CKPT unset: fetching {SD15[1]} from {SD15[0]} "
          "(about 4 GB, once)")
    try:
        return hf_hub_download(*SD15)
    except Exception as e:
        raise ValueError(f"could not download the SD 1.5 checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}): {fix}") from None


def load_model(args, device, dtype):
    """The checkpoint (or random weights) the command line names, in `dtype` on `device`; with
    --compile its UNet's layers compiled."""
    sd = read_model(args, device, dtype)
    if args.compile:
        compile_unet(sd.unet)
    return sd


def architecture(name):
    """(SDConfig, tokenizer) of --random-weights `name`: a model.MODELS preset with the byte-level
    tokenizer, or "lab", the lab model's, read from its file's metadata, with its own tokenizer."""
    if name == "lab":
        path = os.path.join(LAB_DIR, "lab-sd.safetensors")
        if not os.path.isfile(path):
            raise ValueError(f"--random-weights lab takes the lab model's architecture from "
                             f"{path}, which is missing; restore lab/ or choose another one")
        metadata = read_metadata(path)
        return config_from_json(metadata[CONFIG_KEY]), os.path.join(LAB_DIR, "tokenizer")
    return MODELS[name], byte_tokenizer()


def read_model(args, device, dtype):
    if args.random_weights is not None:
        if args.ckpt:
            raise ValueError("give either --ckpt or --random-weights, not both")
        print(f"random weights ({args.random_weights}): the images are noise, "
              "useful only to exercise the pipeline")
        config, default = architecture(args.random_weights)
        config = replace(config, prediction=args.prediction or config.prediction)
        return random_weights(config, device=device, dtype=dtype,
                              tokenizer=default if args.tokenizer is None else args.tokenizer,
                              name=args.random_weights)
    return load_checkpoint(resolve_checkpoint(args.ckpt), device=device, dtype=dtype,
                           prediction=args.prediction, tokenizer=args.tokenizer)


def parse_numbers(text, kind, flag):
    """'0.5,0.4' -> (0.5, 0.4) for a comma-separated list flag."""
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def read_prompts(prompt=None, from_file=None, flag="--from-file"):
    """[prompt], or the non-empty lines of the file `from_file` (named `flag` in errors)."""
    if prompt is not None and from_file:
        raise ValueError(f"give either --prompt or {flag}, not both")
    if from_file:
        if os.path.isdir(from_file):
            raise ValueError(f"prompt file {from_file!r} ({flag}) is a folder; "
                             "give a text file, one prompt per line")
        if not os.path.isfile(from_file):
            raise ValueError(f"prompt file {from_file!r} ({flag}) does not exist")
        try:
            with open(from_file, encoding="utf-8-sig") as f:   # -sig: drops a byte-order mark
                prompts = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt file {from_file!r} ({flag}) is not UTF-8 text "
                             f"(byte {e.object[e.start]:#04x} at offset {e.start}); "
                             "save it as UTF-8") from None
        if not prompts:
            raise ValueError(f"prompt file {from_file!r} ({flag}) holds no prompts "
                             "(one per line expected)")
        return prompts
    if prompt is None:
        raise ValueError(f"give a prompt (--prompt) or a prompt file ({flag})")
    return [prompt]
