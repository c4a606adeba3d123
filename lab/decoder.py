"""lab.train's decoder stage: post_quant_conv and the VAE decoder fine-tuned on whole scenes with the encoder
frozen, and the export of a --stage decoder run (its --init file with only the decoder's tensors replaced).

The latents a UNet was trained on come from the encoder, so a better decoder improves every picture that UNet
draws without retraining it: Stability shipped SD's ft-MSE / ft-EMA decoders the same way. lab/recon.py
measures what it buys.
"""
import copy
import json
import os
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from lab import recon
from lab.cli import FolderError
from lab.run_config import autocast, save, stage_file
from model.checkpoint import VAE, read_metadata
from model.files import CheckpointError, read_state_dict

TRAINED = ("post_quant_conv.", "decoder.")


def edges(images):
    """Differences of vertical and horizontal neighbours: zero inside a flat shape, large on its edge."""
    return images[..., 1:, :] - images[..., :-1, :], images[..., :, 1:] - images[..., :, :-1]


def decoder_loss(rebuilt, images, cfg):
    """L1 and MSE on pixels plus L1 on their neighbour differences. L1 keeps flat areas flat; the MSE term
    weighs the few large errors (a speck, a wrong corner) that L1 counts like any other pixel (on 80 steps
    from the shipped decoder, weight 10 gave 29.8 dB where L1 alone gave 29.3); the differences keep edges
    steep (a blurred edge costs little L1 but its whole step in the differences)."""
    error = rebuilt - images
    edge = sum((a - b).abs().mean() for a, b in zip(edges(rebuilt), edges(images), strict=True))
    return error.abs().mean() + cfg.mse_weight * error.pow(2).mean() + cfg.edge_weight * edge


def decoder_state(vae):
    """What the stage trains and writes: post_quant_conv's and the decoder's tensors."""
    return {k: v for k, v in vae.state_dict().items() if k.startswith(TRAINED)}


def train_decoder(cfg, out, vae, resume, init=None, device="cpu"):
    """Fine-tune post_quant_conv and the decoder on whole 128x128 scenes (borders included), fresh ones every
    step, with the encoder frozen: the latents, and so a UNet trained on them, stay as they are (Stability's
    ft-MSE / ft-EMA decoders for SD are the same move). The decoder learns from posterior means, the latents the
    UNet was trained on; an EMA of its weights (cfg.ema) is the result, warmed up as a fresh UNet's (the starting
    decoder is the one being replaced: its share of the average should fade within the first steps). Every 50 steps
    and at the end: a checkpoint (with `init`, the model file whose decoder this is, for the export), and the
    EMA's PSNR on held-out scenes (lab/recon.py) in decoder.jsonl. -> the VAE with the EMA decoder."""
    path, log_path = os.path.join(out, "decoder.pt"), os.path.join(out, "decoder.jsonl")
    vae.eval().requires_grad_(False)
    params = [p for name, p in vae.named_parameters() if name.startswith(TRAINED)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    ema = copy.deepcopy(vae).requires_grad_(False)
    ema_params = [p for name, p in ema.named_parameters() if name.startswith(TRAINED)]
    step, elapsed = 0, 0.0
    if resume and os.path.exists(path):
        with stage_file(path) as ckpt:
            vae.load_state_dict({**vae.state_dict(), **ckpt["trained"]})
            ema.load_state_dict({**ema.state_dict(), **ckpt["decoder"]})
            opt.load_state_dict(ckpt["opt"])
            step, elapsed = ckpt["step"], ckpt["elapsed"]
    held_out = recon.scenes(cfg.decoder_eval, f"decoder-eval/{cfg.seed}").to(device)

    def checkpoint():
        whole, worst = recon.psnr(recon.reconstruct(ema, held_out), held_out)
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "minutes": elapsed / 60, "psnr": whole.mean().item(),
                                "worst_patch": worst.median().item()}) + "\n")
        save({"decoder": decoder_state(ema), "trained": decoder_state(vae), "opt": opt.state_dict(), "step": step,
              "elapsed": elapsed, "config": asdict(cfg), "init": init and os.path.abspath(init)}, path)

    def done():
        return step >= cfg.decoder_steps if cfg.decoder_steps is not None else elapsed >= cfg.decoder_minutes * 60

    first, bar = step, tqdm(desc="decoder", initial=step, total=cfg.decoder_steps)
    while not done():
        start = time.perf_counter()
        images = recon.scenes(cfg.decoder_batch, f"decoder/{cfg.seed}/{step}").to(device)
        with torch.no_grad(), autocast(device):
            z = vae.moments(images)[0].float()
        with autocast(device):
            rebuilt = vae.decoder(vae.post_quant_conv(z))
        loss = decoder_loss(rebuilt.float(), images, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():   # the EMA is the decoder shipped: steps of 8 scenes move the PSNR by +-0.5 dB
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - min(cfg.ema, (1 + step) / (10 + step)))
        step += 1
        elapsed += time.perf_counter() - start
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", min=f"{elapsed / 60:.1f}")
        if step % 50 == 0 or (done() and step > first):
            checkpoint()
    return ema


def read_decoder(out):
    """The contents of out/decoder.pt, or None where the stage has not run."""
    path = os.path.join(out, "decoder.pt")
    if not os.path.exists(path):
        return None
    with stage_file(path) as ckpt:
        return ckpt


def decoder_export(out, tuned):
    """(state dict, metadata) of a --stage decoder run, `tuned` its decoder.pt: every tensor and the metadata of
    the model it started from as stored, byte for byte, but post_quant_conv's and the decoder's, which are the
    run's (in the file's dtype). FolderError if that file is gone, damaged or no longer has the encoder the
    decoder was tuned for."""
    init, decoder = tuned["init"], tuned["decoder"]
    with stage_file(os.path.join(out, "vae.pt")) as ckpt:
        encoder = {k: v for k, v in ckpt["vae"].items() if not k.startswith(TRAINED)}
    try:
        state = read_state_dict(init)
    except CheckpointError as e:
        raise FolderError(f"{out} fine-tuned the decoder of {init}, whose other tensors it exports, but: {e}") from None
    if any(VAE + k not in state or not torch.equal(state[VAE + k].float(), v) for k, v in encoder.items()):
        raise FolderError(f"{init} has another VAE encoder than the one {out} fine-tuned a decoder for (was it "
                          "replaced?); put that model back, or fine-tune this one's decoder in a new run")
    for k, v in decoder.items():
        state[VAE + k] = v.to(state[VAE + k].dtype).contiguous()
    return state, read_metadata(init)
