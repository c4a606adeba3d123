"""Text to image on a loaded model: the one generation API that sample.py, bench.py, evaluate.py
and search.py share. Load once, then render any number of settings from the same weights:

    from accel import PRESETS
    sd = load_checkpoint("v1-5-pruned-emaonly.safetensors")
    settings = Sampling(steps=50, seed=42, accel=PRESETS["dato-coco"].acceleration())
    images = generate(sd, ["a red fox in the snow"], settings)   # PIL images with their settings
    save_pngs(images, "outputs")   # numbered PNGs keeping those settings, never overwriting

Image k of a call starts from noise seeded with seed + k, drawn on the CPU in fp32, so the same
(prompt, seed, batch) gives the same image on every device and in every tool.
"""
import json
import os
import tempfile
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from model.hardware import DTYPE_CHOICES, dtype_name, resolve_dtype, timed
from model.unet import ATTENTION_BACKENDS

from .loop import check_args, final_step, run_steps
from .samplers import call_sigmas, unet_calls
from .schedule import SettingError

MAX_SEED = 2 ** 64 - 1   # torch.Generator.manual_seed takes seeds up to this


@dataclass(frozen=True)
class Sampling:
    """How to sample; every field has the recommended default.

    steps: sampler steps, 50 for PLMS (the papers' setting: 51 UNet calls), 10-25 for DPM++/UniPC.
    scale: guidance (None: the model's, 7.5 for SD1, 9.0 for SD2; 1 turns guidance off).
    sampler: a name of sampler.SAMPLERS: "plms", "ddim", "dpmpp-2m", "dpmpp-2m-karras", "unipc",
        "euler", "euler-a".
    eta: DDIM noise (0).
    seed: image k of a generate() call starts from seed + k (mod 2**64, torch's seed range).
    size: (H, W) in pixels, multiples of the VAE factor (None, or a None side: the model's
        native size).
    dtype: None keeps the model's precision; "auto" | "fp32" | "bf16" | "fp16" casts the model
        first (load it in the precision you want: casting back up does not restore bits).
    attention: "sdpa" | "math".
    accel: an accel.Acceleration (token methods, caching, guidance per call, skipped calls,
        timesteps) or None; anything with its check(calls, sigmas), check_unet(unet, hw, calls,
        rows), start(calls, seed, guided, sigmas), timesteps and record() will do.
    negative_prompt: the unconditional prompt (""). batch_size: images per sampler batch (1).
    """
    steps: int = 50
    scale: float | None = None
    sampler: str = "plms"
    eta: float = 0.0
    seed: int = 42
    size: tuple | None = None
    dtype: str | None = None
    attention: str = "sdpa"
    accel: object = None
    negative_prompt: str = ""
    batch_size: int = 1

    def __post_init__(self):
        check_args(self.steps, 1.0 if self.scale is None else self.scale, self.sampler, self.eta)
        if not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise SettingError("seed", f"{self.seed!r}: must be a whole number between 0 and "
                               "2**64 - 1")
        if self.size is not None and (not isinstance(self.size, (tuple, list))
                                      or len(self.size) != 2):
            raise SettingError("size", "must be (H, W) in pixels (None: the model's native side), "
                               f"got {self.size!r}")
        for name, side in zip(("H", "W"), self.size or (None, None), strict=True):
            if not (side is None or is_int(side) and side > 0):
                raise SettingError(name, f"{side!r} must be a positive multiple of the VAE "
                                   "factor (8 for SD; size is (H, W) in pixels; None: the model's "
                                   "native side)")
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise SettingError("dtype", f"{self.dtype!r} is not a precision; choose one of "
                               f"{', '.join(DTYPE_CHOICES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise SettingError("attention", f"{self.attention!r}: choose one of "
                               f"{', '.join(ATTENTION_BACKENDS)}")
        methods = ("check", "check_unet", "start", "record")
        if self.accel is not None and not all(hasattr(self.accel, m) for m in methods):
            raise ValueError("accel must be an accel.Acceleration or None, got "
                             f"{type(self.accel).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise SettingError("negative_prompt", "must be text, got "
                               f"{type(self.negative_prompt).__name__}")
        if self.negative_prompt and self.scale == 1:
            warnings.warn("the negative prompt is unused at guidance scale 1 (no guidance: only "
                          "the prompt is sampled)", stacklevel=3)
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise SettingError("batch_size", "(images per batch) must be >= 1, got "
                               f"{self.batch_size!r}")
        if self.accel is not None:   # schedules must fit this sampler, step count and noise levels
            timesteps = getattr(self.accel, "timesteps", None) or None
            self.accel.check(unet_calls(self.steps, self.sampler),
                             call_sigmas(self.sampler, self.steps, timesteps))


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


class Timer:
    """Seconds spent per phase (text, unet, decode) over generate() calls."""

    def __init__(self, device):
        self.device, self.totals = device, {}

    def __call__(self, phase, fn, *args):
        out, seconds = timed(fn, self.device, *args)
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds
        return out


def to_pil(images):
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    pixels = (((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
              .permute(0, 2, 3, 1).cpu())
    return [Image.fromarray(p.numpy()) for p in pixels]


def from_pil(images):
    """PIL images (of one size) -> [B, 3, H, W] uint8 RGB: to_pil's inverse, before scaling."""
    data = torch.stack([torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
                        .view(im.height, im.width, 3) for im in images])
    return data.permute(0, 3, 1, 2)


def prepare(sd, settings):
    """Put the model in the run's precision and attention; check what needs the model (size, what
    the acceleration acts on; the run itself was checked when the Sampling was made). -> (H, W)."""
    if settings.dtype is not None:
        dtype = resolve_dtype(settings.dtype, sd.device)
        if dtype != sd.dtype:
            sd.to(dtype=dtype)
    sd.unet.set_attention(settings.attention)
    H, W = check_size(sd.config, settings.size)
    if settings.accel is not None:   # what the acceleration needs of this UNet at this size
        rows = settings.batch_size * (1 if settings.scale == 1 else 2)   # guided: [uncond; cond]
        settings.accel.check_unet(sd.unet, (H // sd.config.vae.factor, W // sd.config.vae.factor),
                                  unet_calls(settings.steps, settings.sampler), rows)
    return H, W


def generate_batches(sd, prompts, settings, *, progress=False, timer=None):
    """Yield (images, latents) per batch of settings.batch_size prompts, in order; each PIL image
    carries its settings as JSON in image.info["parameters"] (what save_pngs writes)."""
    if not hasattr(sd, "condition") or not hasattr(sd, "unet"):
        raise ValueError("generate() takes a loaded model (model.load_checkpoint(path)), got "
                         f"{type(sd).__name__}")
    if not isinstance(settings, Sampling):
        raise ValueError(f"generate()'s settings must be a Sampling, got {type(settings).__name__}")
    prompts = check_prompts(prompts)
    H, W = prepare(sd, settings)
    device, config = sd.device, sd.config
    timer = timer or Timer(device)
    scale = config.guidance if settings.scale is None else settings.scale
    shape = (config.vae.z_channels, H // config.vae.factor, W // config.vae.factor)
    metadata = dict(negative_prompt=settings.negative_prompt, steps=settings.steps, scale=scale,
                    sampler=settings.sampler, eta=settings.eta, H=H, W=W, checkpoint=sd.source,
                    model=config.version, prediction=config.prediction, dtype=dtype_name(sd.dtype),
                    attention=settings.attention,
                    acceleration=settings.accel.record() if settings.accel else None)
    with torch.inference_mode():
        for k in range(0, len(prompts), settings.batch_size):
            batch = prompts[k:k + settings.batch_size]
            seeds = [(settings.seed + k + i) % (MAX_SEED + 1) for i in range(len(batch))]
            cond = timer("text", sd.condition, batch, (H, W))
            negatives = [settings.negative_prompt] * len(batch)
            uncond = timer("text", sd.condition, negatives, (H, W), True) if scale != 1 else None
            x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                               for s in seeds])
            loop = run_steps(sd.unet, x_T.to(device), cond, uncond, settings.steps, scale,
                             settings.sampler, settings.eta, config.prediction, settings.accel,
                             seeds[0])
            which = f"images {k}-{k + len(batch) - 1}"
            last = timer("unet", final_step,
                         tqdm(loop, total=settings.steps, desc=which, disable=not progress))
            latent = check_finite(last.x, which, sd.dtype)
            images = to_pil(timer("decode", sd.vae.decode, latent.to(device)))
            for i, (prompt, seed, image) in enumerate(zip(batch, seeds, images, strict=True)):
                # adaptive guidance: record what it cost
                stop = {} if last.stops is None else {"guidance_stopped_at": last.stops[i]}
                image.info["parameters"] = json.dumps(
                    dict(prompt=prompt, seed=seed, **metadata, **stop), allow_nan=False)
            yield images, latent


def generate(sd, prompts, settings=Sampling(), *, latents=False, progress=False, timer=None):
    """Images for `prompts` (a str or a list) with `settings` on the loaded model `sd`. Returns
    PIL images, or (images, final latents [N, c, h, w]) with latents=True. Writes no files."""
    images, finals = [], []
    for batch, latent in generate_batches(sd, prompts, settings, progress=progress, timer=timer):
        images += batch
        finals.append(latent)
    return (images, torch.cat(finals)) if latents else images


def save_png(image, path):
    """Write `image` with its settings (image.info["parameters"]) to `path`, which must not exist.
    Raises FileExistsError rather than overwrite; an interrupted write leaves no partial file."""
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    with open(path, "xb") as f:
        try:
            image.save(f, format="PNG", pnginfo=info)
        except BaseException:
            f.close()
            os.remove(path)
            raise
    return path


def save_pngs(images, outdir):
    """Write images as outdir/NNNNN.png, numbered after the highest existing number and never
    overwriting; the folder is created with the first image. Returns the paths."""
    if not isinstance(outdir, (str, os.PathLike)):
        raise ValueError(f"save_pngs writes into a folder path, got {outdir!r}")
    if isinstance(images, Image.Image):
        raise ValueError("save_pngs writes a list of PIL images (what generate() returns), got one "
                         "image: put it in a list")
    images = list(images)   # any iterable, read once
    if wrong := [type(im).__name__ for im in images if not isinstance(im, Image.Image)]:
        raise ValueError("save_pngs writes a list of PIL images (what generate() returns), got "
                         f"{wrong[0]}")
    check_outdir(os.fspath(outdir), "save_pngs' folder")
    paths = []
    for image in images:
        os.makedirs(outdir, exist_ok=True)
        taken = [int(f[:-4]) for f in os.listdir(outdir) if f.endswith(".png") and f[:-4].isascii()
                 and f[:-4].isdigit()]   # ASCII digits only: int() refuses "²"
        n = max(taken, default=-1) + 1
        while True:
            try:
                paths.append(save_png(image, os.path.join(outdir, f"{n:05d}.png")))
                break
            except FileExistsError:   # another writer took the number
                n += 1
    return paths


__all__ = ["Sampling", "generate", "generate_batches", "save_png", "save_pngs", "check_outdir",
           "Timer", "to_pil", "from_pil"]


def check_prompts(prompts):
    """A str is one prompt; otherwise a non-empty list of str."""
    if isinstance(prompts, str):
        return [prompts]
    if (not isinstance(prompts, (list, tuple)) or not prompts
            or not all(isinstance(p, str) for p in prompts)):
        raise ValueError("prompts must be a prompt (str) or a non-empty list of prompts")
    return list(prompts)


def check_size(config, size):
    """(H, W) or None -> (H, W) that a model of this SDConfig can decode; warns far beyond its
    training size and below the size its UNet's downsamplings need (SD: 64 px, a latent of 8
    halved 3 times), refuses half that."""
    factor, native = config.vae.factor, config.image_size
    halvings = len(config.unet.channel_mult) - 1
    least = factor * 2 ** halvings   # the deepest level keeps a whole cell
    H, W = (native if side is None else side for side in size or (None, None))
    for name, side in (("H", H), ("W", W)):
        if side <= 0 or side % factor:
            raise SettingError(name, f"{side} must be a positive multiple of {factor} (the VAE "
                               f"works on {factor}x{factor} pixel cells)")
        if side < least:
            problem = (f"{side} px is below this model's smallest size, {least} px: its latent "
                       f"({side // factor}) is halved {halvings} times by the UNet")
            if 2 * side < least:
                raise SettingError(name, problem + ", leaving nothing to draw with")
            warnings.warn(f"{name} {problem}; the image will be mostly noise", stacklevel=3)
        if side > 4 * native:
            warnings.warn(f"{name} {side}: far beyond this model's {native} px training size "
                          "(images repeat and memory grows with the square of the side)",
                          stacklevel=3)
    return H, W


def check_finite(latent, which, dtype):
    """The sampled latent; NaN or inf (which decode to black) raise a one-line error instead."""
    if not torch.isfinite(latent).all():
        hint = ("fp16 overflows in some models: load in bf16 or fp32" if dtype == torch.float16
                else "the weights or the guidance scale overflow")
        raise ValueError(f"{which}: the sampled latent holds NaN or inf ({hint}); no image written")
    return latent


def check_outdir(outdir, flag="outdir"):
    """Raise ValueError (naming `flag`, the caller's name for it) unless files can be written to
    the folder `outdir`. Tested by a real write that leaves nothing behind (a temporary file there,
    or in the nearest existing folder above): permission bits say yes where writing fails (/proc,
    a read-only mount, root's os.access)."""
    if not outdir:
        raise ValueError(f"{flag} is empty; name a folder")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise ValueError(f"{flag} {outdir!r} is a file, not a folder; choose another {flag}")
    folder = os.path.abspath(outdir)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        if not os.path.isdir(folder):
            raise NotADirectoryError(folder)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        what = "is not writable" if folder == os.path.abspath(outdir) else \
            f"cannot be created ({folder!r} is not a writable folder)"
        raise ValueError(f"{flag} {outdir!r} {what}; choose another {flag}") from None
