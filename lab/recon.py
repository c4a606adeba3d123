"""How well a lab model's VAE gives back a scene: decode(encode(x)) on fresh scenes, no UNet involved.

    python -m lab.recon --ckpt lab/lab-sd.safetensors --n 64 --seed recon   # PSNR and worst-patch PSNR

PSNR is over 8-bit pixels (what a PNG shows), one value per image, averaged. The worst-patch PSNR is the
PSNR of an image's worst 8x8 patch, the median over images: a speck or a smeared corner barely moves the
whole image's PSNR but sets that patch's. The encoder gives the posterior mean, as when the UNet's training
latents were made (lab.train's latents stage), so these are the latents a decoder must turn back into scenes.
"""
import torch
import torch.nn.functional as F

from lab.cli import Parser, path_flag, set_threads
from lab.scenes import image_seed, render, sample_captions
from model.checkpoint import CONFIG_KEY, VAE, read_metadata
from model.config import config_from_json
from model.files import read_state_dict
from model.vae import AutoencoderKL
from sampler.generate import from_pil

PATCH = 8


def scenes(n, seed, pairs=0.5):
    """n fresh scenes as [n, 3, H, W] in [-1, 1]; the same (n, seed) gives the same images."""
    captions = sample_captions(n, seed=f"{seed}", pairs=pairs)
    return from_pil([render(c, image_seed(seed, k)) for k, c in enumerate(captions)]).float() / 127.5 - 1


def load_vae(path):
    """The whole VAE (encoder too) of a lab model file, fp32, at scale 1 (reconstruction needs no latent scale)."""
    metadata = read_metadata(path)
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata; give a lab model written by lab.train --export")
    state = {k[len(VAE):]: v.float() for k, v in read_state_dict(path).items() if k.startswith(VAE)}
    if not any(k.startswith("encoder.") for k in state):
        raise ValueError(f"{path} holds no VAE encoder (first_stage_model.encoder.*), so nothing can be encoded")
    vae = AutoencoderKL(config_from_json(metadata[CONFIG_KEY]).vae, scale_factor=1.0, encoder=True)
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


def measure(vae, n=64, seed="recon"):
    """{"psnr": mean PSNR, "worst_patch": median worst-patch PSNR, "n": n} on n fresh scenes."""
    images = scenes(n, seed)
    whole, worst = psnr(reconstruct(vae, images), images)
    return {"psnr": whole.mean().item(), "worst_patch": worst.median().item(), "n": n}


def main(argv=None):
    p = Parser(prog="python -m lab.recon", description=__doc__)
    p.add_argument("--ckpt", default="lab/lab-sd.safetensors", type=path_flag, help="a lab model file")
    p.add_argument("--n", type=int, default=64, help="fresh scenes to reconstruct (64)")
    p.add_argument("--seed", default="recon", help="their seed (recon; lab.train's decoder stage trains on others)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    set_threads(p, args)
    try:
        vae = load_vae(args.ckpt)
    except ValueError as e:   # CheckpointError is one: a missing or damaged file
        p.error(f"--ckpt: {e}")
    result = measure(vae, args.n, args.seed)
    print(f"{args.ckpt}: PSNR {result['psnr']:.2f} dB, median worst {PATCH}x{PATCH} patch "
          f"{result['worst_patch']:.2f} dB ({args.n} scenes, seed {args.seed})")
    return result


if __name__ == "__main__":
    main()
