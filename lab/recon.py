"""How well a lab model's VAE gives back a scene: decode(encode(x)) on fresh scenes, no UNet involved.

    python -m lab.recon --ckpt lab/lab-sd.safetensors --n 64 --seed recon   # PSNR and worst-patch PSNR
    python -m lab.recon --ckpt old.safetensors --ckpt lab/lab-sd.safetensors --sheet recon.png   # and a picture

PSNR is over 8-bit pixels (what a PNG shows), one value per image, averaged. The worst-patch PSNR is the
PSNR of an image's worst 8x8 patch, the median over images: a speck or a smeared corner barely moves the
whole image's PSNR but sets that patch's. The encoder gives the posterior mean, as when the UNet's training
latents were made (lab.train's latents stage), so these are the latents a decoder must turn back into scenes.
"""
import torch
import torch.nn.functional as F
from PIL import Image

from lab.cli import FolderError, check_new_file, path_flag
from lab.encoder import TrainableVAE
from lab.scenes import image_seed, render, sample_captions
from model.checkpoint import CONFIG_KEY, VAE, read_metadata
from model.config import config_from_json
from model.files import read_state_dict
from sampler.cli import Parser, set_threads
from sampler.generate import from_pil, to_pil

PATCH = 8


def scenes(n, seed):
    """n fresh scenes (half of them pairs) as [n, 3, H, W] in [-1, 1]; the same (n, seed) gives the same images."""
    captions = sample_captions(n, seed=str(seed))
    return from_pil([render(c, image_seed(seed, k)) for k, c in enumerate(captions)]).float() / 127.5 - 1


def load_vae(path):
    """The whole VAE (encoder too) of a lab model file, fp32, at scale 1 (reconstruction needs no latent scale)."""
    state = {k[len(VAE):]: v.float() for k, v in read_state_dict(path).items() if k.startswith(VAE)}
    metadata = read_metadata(path)
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata; give a lab model written by lab.train --export")
    if not any(k.startswith("encoder.") for k in state):
        raise ValueError(f"{path} holds no VAE encoder (first_stage_model.encoder.*), so nothing can be encoded")
    vae = TrainableVAE(config_from_json(metadata[CONFIG_KEY]).vae)
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def reconstruct(vae, images, batch=16):
    """decode(posterior mean of encode(images)), in [-1, 1], rounded to 8-bit levels as a saved PNG is."""
    out = [vae.decoder(vae.post_quant_conv(vae.moments(x)[0])) for x in images.split(batch)]
    return ((torch.cat(out).clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def psnr(recon, images):
    """-> (PSNR of each image, PSNR of each image's worst PATCH x PATCH patch), in dB on a [0, 1] scale."""
    error = ((recon - images) / 2).pow(2).mean(dim=1, keepdim=True)   # [B, 1, H, W]
    whole = error.mean(dim=(1, 2, 3))
    worst = F.avg_pool2d(error, PATCH).flatten(1).amax(dim=1)
    return -10 * whole.clamp(min=1e-10).log10(), -10 * worst.clamp(min=1e-10).log10()


def sheet(images, rows, columns=8, zoom=2):
    """The first `columns` scenes above their reconstructions (one row per model), each pixel zoom x zoom."""
    picture = torch.cat([torch.cat(list(x[:columns]), dim=2) for x in (images, *rows)], dim=1)   # [3, H*r, W*c]
    image = to_pil(picture[None])[0]
    return image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)


def main(argv=None):
    p = Parser(prog="python -m lab.recon", description=__doc__)
    p.add_argument("--ckpt", action="append", type=path_flag,
                   help="a lab model file (lab/lab-sd.safetensors); repeat to compare several")
    p.add_argument("--n", type=int, default=64, help="fresh scenes to reconstruct (64)")
    p.add_argument("--seed", default="recon", help="their seed (recon; lab.train's decoder stage trains on others)")
    p.add_argument("--sheet", type=path_flag, metavar="FILE",
                   help="also draw the first 8 scenes above their reconstructions, a row per --ckpt (a new .png)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    paths = args.ckpt or ["lab/lab-sd.safetensors"]
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    if args.sheet is not None:
        if not args.sheet.lower().endswith(".png"):
            p.error(f"--sheet {args.sheet}: the name must end in .png, the format written")
        try:
            check_new_file(args.sheet, "--sheet")
        except FolderError as e:
            p.error(str(e))
    set_threads(p, args)
    try:
        vaes = [load_vae(path) for path in paths]
    except (ValueError, RuntimeError) as e:   # CheckpointError is a ValueError; other shapes a RuntimeError
        p.error(f"--ckpt: {str(e).splitlines()[0]}")
    images, rows = scenes(args.n, args.seed), []
    for path, vae in zip(paths, vaes, strict=True):
        rows.append(reconstruct(vae, images))
        whole, worst = psnr(rows[-1], images)
        print(f"{path}: PSNR {whole.mean():.2f} dB, median worst {PATCH}x{PATCH} patch {worst.median():.2f} dB "
              f"({args.n} scenes, seed {args.seed})")
    if args.sheet is not None:
        sheet(images, rows).save(args.sheet)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; nothing written") from None
