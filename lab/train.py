"""Train the lab model from nothing on a CPU: a small Stable Diffusion (lab.run_config.LAB) on
generated scenes (lab/scenes.py), judged by the exact caption checker (lab/check.py).

    python -m lab.train --out runs/lab                    # every stage; checkpoints as it goes
    python -m lab.train --out runs/lab --resume           # continue exactly where it stopped
    python -m lab.train --out runs/lab --resume --unet-minutes 90   # train the UNet longer (90 in all)
    python -m lab.train --out runs/lab2 --init lab/lab-sd.safetensors --compile   # continue the shipped model
    python -m lab.train --out runs/lab --export lab/lab-sd-new.safetensors   # then mv it over lab/lab-sd.safetensors
    python -m lab.train --out runs/gpu --init lab/lab-sd.safetensors --device cuda --batch 256 --latents 60000
    python -m lab.train --out runs/dec --init lab/lab-sd.safetensors --stage decoder --decoder-minutes 65  # its decoder

RUN/config.json records a run's settings (--init included) before anything else is written; --resume takes
them from there. Only --unet-minutes and --decoder-minutes (new totals) and --eval-minutes (from the next
evaluation on) may change on --resume, with --device, --compile and --threads, which are not part of the recipe;
a --batch, --latents, --stage or --init other than the recorded one is refused (the same value is accepted, so
the command that started a run, with --resume, continues it). --out is a new or empty folder or a run (it holds
config.json): a run writes over its own files only. An export never overwrites a file.

Stages, each resumable from its checkpoint in --out:
1. tokenizer: a CLIP BPE tokenizer whose merges spell the scene words (any other text falls back
   to byte symbols, as for any CLIP model); a run continued with --init keeps its model's.
2. vae: the KL autoencoder (factor 4) on random 64x64 crops of scenes (it is convolutional: it
   works on 128x128 after), L1 + MSE reconstruction and a small KL term, as LDM's first stage
   without the GAN.
3. latents: N scenes rendered once and encoded (posterior means); scale_factor = 1 / their std.
4. unet: UNet and text encoder together, eps-prediction on LDM's schedule, min-SNR-5 loss weights, 10% empty
   captions (for guidance), AdamW with warm-up, an EMA of the weights, bf16 autocast on GPUs and on CPUs with
   native bf16. Every --eval-minutes the EMA model samples fixed captions through the real pipeline and the
   checker scores them: the learning curve (accuracy against training time) goes to log.jsonl and curve.png.
5. decoder (lab/decoder.py): fine-tuned on whole scenes, encoder frozen; a run from nothing ends with it, --init
   keeps its model's decoder, --stage decoder --init FILE runs it alone.
6. export (lab/export.py): the EMA weights, fp16, SD1 layout, config in the metadata, tokenizer beside it.
Batches, noise and timesteps come from CPU generators seeded by (seed, step): a resumed run equals an unbroken one.
"""
import copy
import filecmp
import functools
import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from lab.check import check, summary
from lab.cli import FolderError
from lab.decoder import decoder_export, read_decoder, train_decoder
from lab.encoder import TrainableVAE
from lab.export import checkpoint_state
from lab.pictures import draw_curve, grid
from lab.run_config import LAB, TrainConfig, autocast, check_export, parser, prepare, save, stage_file
from lab.scenes import image_seed, render, sample_captions
from lab.vocab import write_lab_tokenizer
from model import StableDiffusion
from model.checkpoint import CLIP, CONFIG_KEY, TOKENIZER_KEY, UNET, VAE, read_metadata
from model.config import config_from_json
from model.files import read_state_dict
from model.text import TextEncoder
from model.unet import UNetModel
from sampler.cli import set_threads
from sampler.generate import Sampling, from_pil, generate
from sampler.schedule import alphas_cumprod


def write_folder(folder, write):
    """`write(tmp)` fills a temporary folder, renamed to `folder` once whole: an interrupted write never leaves
    a partial tokenizer, which a resumed run would take for whole (and a few lost merges change token ids)."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)   # left by an interrupted write
    write(tmp)
    os.replace(tmp, folder)


def to_tensor(images):
    """PIL images -> [B, 3, H, W] in [-1, 1]."""
    return from_pil(images).float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# stage 2: the autoencoder

def train_vae(cfg, out, resume, device="cpu"):
    path = os.path.join(out, "vae.pt")
    torch.manual_seed(cfg.seed)
    vae = TrainableVAE(LAB.vae).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = 0
    if resume and os.path.exists(path):
        with stage_file(path) as ckpt:
            vae.load_state_dict(ckpt["vae"])
            if ckpt["step"] >= cfg.vae_steps:
                return vae
            opt.load_state_dict(ckpt["opt"])
            step = ckpt["step"]
    bar = tqdm(range(step, cfg.vae_steps), initial=step, total=cfg.vae_steps, desc="vae")
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rng = random.Random(f"vae/{cfg.seed}/{step}")
        captions = sample_captions(cfg.vae_batch, seed=f"vae/{cfg.seed}/{step}")
        images = to_tensor([render(c, rng) for c in captions])
        y, x = (int(v) for v in torch.randint(0, 128 - cfg.vae_crop + 1, (2,), generator=g))
        images = images[..., y:y + cfg.vae_crop, x:x + cfg.vae_crop].to(device)
        with autocast(device):
            mean, logvar = vae.moments(images)
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g).to(device)
            recon = vae.decoder(vae.post_quant_conv(z))
        mean, logvar, recon = mean.float(), logvar.float(), recon.float()
        rec = (recon - images).abs().mean() + F.mse_loss(recon, images)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.0f}")
        if (step + 1) % 100 == 0 or step + 1 == cfg.vae_steps:
            save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, path)
    return vae


# ---------------------------------------------------------------------------------------------
# stage 3: latents

def render_workers():
    """A pool of spawned processes (safe beside an initialised GPU) that ignore Ctrl-C, as they inherit it
    ignored from their start: the main process stops them, and a traceback from each would bury its message."""
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return multiprocessing.get_context("spawn").Pool(os.cpu_count())
    finally:
        signal.signal(signal.SIGINT, handler)


@torch.no_grad()
def encode_latents(cfg, out, vae, resume, scale_factor=None, device="cpu"):
    """The training latents; scale_factor 1 / their std unless given (a model being continued keeps its own).
    Scenes render in worker processes (render_workers), the VAE encodes on `device`."""
    path = os.path.join(out, "latents.pt")
    if resume and os.path.exists(path):
        with stage_file(path) as data:   # what the UNet stage takes from it: a KeyError here, not there
            return {key: data[key] for key in ("latents", "captions", "scale_factor")}
    captions = sample_captions(cfg.latents, seed=f"train/{cfg.seed}", pairs=cfg.pairs)
    jobs = [(c, image_seed(f"train/{cfg.seed}", k)) for k, c in enumerate(captions)]
    chunks, size = [], 1024
    with render_workers() as pool:
        for k in tqdm(range(0, len(jobs), size), desc="latents"):
            images = to_tensor(pool.starmap(render, jobs[k:k + size], chunksize=32))
            for batch in images.split(256):
                with autocast(device):
                    chunks.append(vae.moments(batch.to(device))[0].float().cpu())
    latents = torch.cat(chunks)
    data = {"latents": latents.half(), "captions": captions, "scale_factor": scale_factor or 1 / latents.std().item()}
    save(data, path)
    return data


# ---------------------------------------------------------------------------------------------
# stage 4: UNet and text encoder

def lab_model(vae, scale_factor, tokenizer):
    """A StableDiffusion with the LAB architecture, the trained VAE (its encoder kept, so that an
    export can be trained on) and a fresh UNet and text encoder."""
    config = replace(LAB, scale_factor=round(scale_factor, 5))
    vae.scale_factor = config.scale_factor
    return StableDiffusion(UNetModel(config.unet), vae, TextEncoder(config.text, tokenizer), config)


def batch_indices(seed, step, batch, n):
    """Scene indices of batch `step`: shuffled epochs (each scene once per epoch) laid end to end and cut
    into full batches, so every batch has the same shape (a compiled UNet is never recompiled) and no
    scene is skipped where an epoch ends."""
    start = step * batch
    epochs = range(start // n, (start + batch - 1) // n + 1)
    stream = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + e)) for e in epochs])
    offset = start - epochs[0] * n
    return stream[offset:offset + batch]


def min_snr_weights(alphas, t, gamma):
    """For eps-prediction: min(SNR, gamma) / SNR, SNR = ᾱ / (1 - ᾱ)."""
    snr = alphas[t] / (1 - alphas[t])
    return snr.clamp(max=gamma) / snr


def evaluate(sd, ema, cfg, captions):
    """Checker accuracy of the EMA model on fixed captions, through the real sampling pipeline."""
    model = StableDiffusion(ema["unet"], sd.vae, ema["text"], sd.config, "lab (training)")
    images = generate(model, captions, Sampling(steps=cfg.eval_steps, seed=1000, batch_size=16))
    report = summary([{"caption": c, "correct": check(image, c).correct}
                      for image, c in zip(images, captions, strict=True)])
    kinds = {kind: entry["accuracy"] or 0.0 for kind, entry in report["by_kind"].items()}
    return {"accuracy": report["accuracy"], **kinds}, images


def train_unet(cfg, out, sd, data, resume, compile_unet=False, continued=False):
    """Trains sd.unet and sd.text where they are (their device); `compile_unet`: through torch.compile
    (the same parameters: checkpoints and the EMA see sd.unet as ever). `continued`: the weights are a
    trained model's EMA, so the EMA keeps its full decay from the first step (a run resumed remembers)."""
    path, log_path = os.path.join(out, "unet.pt"), os.path.join(out, "log.jsonl")
    torch.manual_seed(cfg.seed)
    sd.unet.train().requires_grad_(True)
    sd.text.train().requires_grad_(True)
    params = [*sd.unet.parameters(), *sd.text.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = {"unet": copy.deepcopy(sd.unet).eval().requires_grad_(False),
           "text": copy.deepcopy(sd.text).eval().requires_grad_(False)}
    step, elapsed, next_eval = 0, 0.0, 0.0
    if resume and os.path.exists(path):
        with stage_file(path) as ckpt:
            sd.unet.load_state_dict(ckpt["unet"])
            sd.text.load_state_dict(ckpt["text"])
            ema["unet"].load_state_dict(ckpt["ema_unet"])
            ema["text"].load_state_dict(ckpt["ema_text"])
            opt.load_state_dict(ckpt["opt"])
            step, elapsed, next_eval = ckpt["step"], ckpt["elapsed"], ckpt["next_eval"]
            continued = ckpt.get("continued", False)
    device = sd.device
    latents = data["latents"].to(device).float() * sd.config.scale_factor
    captions, n = data["captions"], len(data["captions"])
    eval_captions = sample_captions(cfg.eval_captions, seed=f"eval/{cfg.seed}")
    alphas = alphas_cumprod().float().to(device)
    ema_params = [*ema["unet"].parameters(), *ema["text"].parameters()]
    unet = torch.compile(sd.unet) if compile_unet else sd.unet

    def checkpoint():
        save({"unet": sd.unet.state_dict(), "text": sd.text.state_dict(), "ema_unet": ema["unet"].state_dict(),
              "ema_text": ema["text"].state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
              "next_eval": next_eval, "continued": continued, "config": asdict(cfg)}, path)

    def done():
        return step >= cfg.unet_steps if cfg.unet_steps is not None else elapsed >= cfg.unet_minutes * 60

    def log_evaluation():
        """One point of the learning curve: the EMA model's checker accuracy, appended to log.jsonl."""
        metrics, images = evaluate(sd, ema, cfg, eval_captions)
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "minutes": elapsed / 60, **metrics}) + "\n")
        if not draw_curve(log_path, os.path.join(out, "curve.png")):
            tqdm.write("curve.png skipped: it needs matplotlib (pip install -r requirements-eval.txt); "
                       "log.jsonl has its numbers")
        return images

    finished = step > 0 and done()   # resumed after the stage ended (in the decoder stage): its log is whole
    bar = tqdm(desc="unet", initial=step, total=cfg.unet_steps)
    while not done():
        if elapsed >= next_eval:   # the learning curve: accuracy of the EMA model against training time
            images = log_evaluation()
            grid(images[:16], eval_captions[:16]).save(os.path.join(out, f"samples_{step:06d}.png"))
            next_eval += cfg.eval_minutes * 60
            checkpoint()
        start = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        index = batch_indices(cfg.seed, step, cfg.batch, n)
        x0 = latents[index.to(device)]
        text = [captions[i] for i in index.tolist()]
        drop = torch.rand(len(text), generator=g) < cfg.uncond
        text = ["" if d else c for d, c in zip(drop.tolist(), text, strict=True)]
        t = torch.randint(0, len(alphas), (len(text),), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        with autocast(device):
            eps = unet(x_t, t, sd.text(text))
        loss = (min_snr_weights(alphas, t, cfg.min_snr) * (eps.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            # a fresh model's EMA warms up, so early evaluations mean something; a continued model's already
            # averages many steps, and a warm-up would trade it for the last few noisy ones
            decay = cfg.ema if continued else min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        step += 1
        elapsed += time.perf_counter() - start
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", min=f"{elapsed / 60:.1f}")
        if step % 100 == 0:
            checkpoint()
    if not finished:
        log_evaluation()
        checkpoint()
    return ema


def export(out, path):
    """The model of run `out` -> `path` (fp16, official SD1 layout) with the run's tokenizer beside it
    (in tokenizer/; refused if a different tokenizer is there, or if `path` exists: nothing is overwritten).
    A run's model is its EMA UNet and text encoder with its VAE, whose decoder is decoder.pt's once that
    stage has run; a --stage decoder run's is its --init file with only the decoder's tensors replaced."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose another name (checkpoints are never overwritten)")
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
    ours = os.path.join(out, "tokenizer")
    if os.path.exists(folder) and not all(filecmp.cmp(os.path.join(folder, name), os.path.join(ours, name),
                                                      shallow=False) for name in ("vocab.json", "merges.txt")):
        raise SystemExit(f"{folder} holds a different tokenizer from {ours}, whose token ids this model was "
                         "trained on; export into another folder, or move that tokenizer away first")
    tuned = read_decoder(out)   # a --stage decoder run exports its --init file, any other run its own model
    state, metadata = (decoder_export if tuned and tuned["config"]["stage"] == "decoder" else run_export)(out, tuned)
    if not os.path.exists(folder):
        write_folder(folder, functools.partial(shutil.copytree, ours))
    tmp = path + ".tmp"   # written under another name first: an interrupted export leaves no torn `path`
    if os.path.exists(tmp):
        os.remove(tmp)
    save_file(state, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def run_export(out, tuned):
    """(state dict, metadata) of a run trained up to its UNet stage: EMA weights, fp16; decoder.pt's decoder (tuned)."""
    with stage_file(os.path.join(out, "latents.pt")) as data:
        scale_factor = data["scale_factor"]
    with stage_file(os.path.join(out, "unet.pt")) as ckpt:
        sd = lab_model(train_vae(TrainConfig(**ckpt["config"]), out, True), scale_factor, None)
        sd.unet.load_state_dict(ckpt["ema_unet"])
        sd.text.load_state_dict(ckpt["ema_text"])
    if tuned is not None:
        sd.vae.load_state_dict({**sd.vae.state_dict(), **tuned["decoder"]})
    return checkpoint_state(sd, tokenizer="tokenizer")


def start_from(path, out, cfg):
    """Continue a shipped model: its tokenizer becomes the run's (its text encoder learned those token
    ids), its VAE the finished stage 2, and its UNet and text encoder the start of stage 4 (the optimizer
    starts afresh). A resumed run keeps the tokenizer and VAE it has. -> (scale_factor, the file's state dict)."""
    metadata = read_metadata(path)
    folder = os.path.join(out, "tokenizer")
    if not os.path.exists(folder):
        shipped = os.path.join(os.path.dirname(os.path.abspath(path)), metadata.get(TOKENIZER_KEY, "tokenizer"))
        write_folder(folder, functools.partial(shutil.copytree, shipped))
    state = {k: v.float() for k, v in read_state_dict(path).items()}
    vae_path = os.path.join(out, "vae.pt")
    if not os.path.exists(vae_path):   # its latents were encoded with this one, whatever the file holds now
        save({"vae": {k[len(VAE):]: v for k, v in state.items() if k.startswith(VAE)}, "step": cfg.vae_steps},
             vae_path)
    return config_from_json(metadata[CONFIG_KEY]).scale_factor, state


def run(cfg, out, resume, init=None, device="cpu", compile_unet=False):
    """Every stage, each continuing from its checkpoint when `resume`; `init`: a shipped .safetensors to
    continue training (a new --out); `compile_unet`: train the UNet through torch.compile. The command line
    records the run's settings (config.json) first: lab/run_config.py. -> (sd, the EMA UNet and text encoder),
    or with cfg.stage "decoder" the VAE with its fine-tuned decoder."""
    os.makedirs(out, exist_ok=True)
    scale_factor, shipped = start_from(init, out, cfg) if init else (None, None)
    tokenizer = os.path.join(out, "tokenizer")   # a resumed or continued run keeps the one it has
    if not os.path.exists(tokenizer):
        write_folder(tokenizer, write_lab_tokenizer)
    vae = train_vae(cfg, out, resume or init is not None, device).eval().requires_grad_(False)
    if cfg.stage == "decoder":   # the model's decoder alone: its UNet and text encoder stay in the file
        return train_decoder(cfg, out, vae, resume, init, device)
    data = encode_latents(cfg, out, vae, resume, scale_factor, device)
    torch.manual_seed(cfg.seed)   # the fresh UNet and text encoder, whatever the earlier stages drew
    sd = lab_model(vae, data["scale_factor"], tokenizer)
    if shipped is not None:
        sd.unet.load_state_dict({k[len(UNET):]: v for k, v in shipped.items() if k.startswith(UNET)})
        text = {k[len(CLIP):]: v for k, v in shipped.items() if k.startswith(CLIP) and "position_ids" not in k}
        sd.text.transformer.load_state_dict(sd.text.adapt_keys(text))
    sd.to(device)
    ema = train_unet(cfg, out, sd, data, resume, compile_unet, continued=shipped is not None)
    if shipped is None:   # from nothing: the decoder, fine-tuned last (a continued model keeps its own)
        sd.vae = train_decoder(cfg, out, sd.vae, resume, device=device)
    return sd, ema


def main(argv=None):
    p = parser(__doc__)
    args = p.parse_args(argv)
    set_threads(p, args)   # at most the cores: far above, torch's thread pool fails
    if args.export is not None:
        check_export(p, args)
        try:
            print(export(args.out, args.export))
        except KeyboardInterrupt:   # the file is written under another name first
            raise SystemExit(f"interrupted; {args.export} was not written: rerun the same command") from None
        except FolderError as e:   # a stage file that cannot be read (run_config.stage_file)
            p.error(str(e))
        return
    cfg, init, device = prepare(p, args)   # every check, then config.json: before any heavy work
    try:
        run(cfg, args.out, args.resume, init, device, args.compile)
    except KeyboardInterrupt:   # every checkpoint is whole (written atomically); the last one is where --resume starts
        raise SystemExit("interrupted; rerun the same command with --resume to continue from the last checkpoint "
                         f"in {args.out}") from None
    except FolderError as e:   # a stage file that cannot be read (run_config.stage_file)
        p.error(str(e))


if __name__ == "__main__":
    main()
