"""The lab's feature network: what a Fréchet distance compares on lab scenes, in place of Inception.

FID compares generated and real images as two Gaussians in Inception-v3's feature space. Those weights
cannot be downloaded here, and Inception never saw flat shapes on grey. This small CNN is trained on
lab scenes to read exactly what a scene is made of: for each of the 12 colour-shape combinations,
whether it is there, where its centroid is and how large it is. Its penultimate activations (64 numbers)
are the features; the Fréchet distance between two image sets in this space is reported as "lab FD"
(evaluate.py), never as FID: the numbers are not comparable with anyone's FID.

    python -m lab.features --out lab/lab-features.safetensors [--scenes 16384] [--steps 4000] [--threads 2]

Deterministic for a given --seed (scenes, initialisation, batches); 5.3 min on 2 CPU cores. It prints its
held-out accuracy; the shipped lab/lab-features.safetensors (these defaults) gets every combination's
presence right on 100% of 1024 fresh scenes and places centroids within 2.0 px on average.
"""
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lab.cli import FolderError, path_flag, save_new
from lab.scenes import COLORS, SHAPES, SceneConfig, draw, image_seed, layout, sample_description
from sampler.cli import Parser, set_threads
from sampler.generate import from_pil

COMBOS = tuple((color, shape) for color in COLORS for shape in SHAPES)
CONFIG_KEY = "lab_features_config"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lab-features.safetensors")   # the lab FD's features
SCENES = SceneConfig()   # the lab model's scenes


@dataclass(frozen=True)
class FeatureConfig:
    size: int = 128          # input side: other sizes are resized to it
    width: int = 16          # channels of the first conv; doubled twice, over five stride-2 convs
    features: int = 64       # the Fréchet features: small, so 256 images estimate their covariance


class LabFeatures(nn.Module):
    """uint8 RGB images [B, 3, H, W] -> features [B, config.features] (torchmetrics' custom-extractor
    contract: `num_features`, uint8 in). `heads` reads the scene description off the features."""

    def __init__(self, config=FeatureConfig()):
        super().__init__()
        self.config = config
        w = config.width
        widths = (3, w, 2 * w, 4 * w, 4 * w, 4 * w)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1)
                                   for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.norms = nn.ModuleList(nn.GroupNorm(8, b) for b in widths[1:])
        cells = (config.size // 32) ** 2   # keeps positions: no global pooling before the features
        self.embed = nn.Linear(4 * w * cells, config.features)
        self.heads = nn.Linear(config.features, 4 * len(COMBOS))   # presence logit, x, y, side per combo
        self.num_features = config.features

    def forward(self, images):
        x = images.float() / 127.5 - 1
        if x.shape[-2:] != (self.config.size, self.config.size):
            x = F.interpolate(x, size=(self.config.size, self.config.size), mode="bilinear", antialias=True)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.silu(norm(conv(x)))
        return F.silu(self.embed(x.flatten(1)))

    def describe(self, images):
        """-> (presence logits [B, 12], geometry [B, 12, 3] = centroid x, y and side as fractions of the side)."""
        out = self.heads(self(images)).view(-1, len(COMBOS), 4)
        return out[..., 0], out[..., 1:]


def targets(scene, config=SCENES):
    """(presence [12], geometry [12, 3]) of a lab Scene, the network's training targets."""
    presence, geometry = torch.zeros(len(COMBOS)), torch.zeros(len(COMBOS), 3)
    for placed in scene.objects:
        i = COMBOS.index((placed.color, placed.shape))
        x, y = placed.centroid
        presence[i] = 1
        geometry[i] = torch.tensor([x, y, placed.side]) / config.size
    return presence, geometry


def scenes(n, seed, config=SCENES):
    """n random lab scenes: (uint8 images [n, 3, H, W], presence [n, 12], geometry [n, 12, 3])."""
    images, presence, geometry = [], [], []
    for k in range(n):
        rng = random.Random(image_seed(seed, k))
        scene = layout(sample_description(rng), rng, config)
        p, g = targets(scene, config)
        images.append(draw(scene, config))
        presence.append(p)
        geometry.append(g)
    return from_pil(images), torch.stack(presence), torch.stack(geometry)


def loss_fn(net, images, presence, geometry):
    logits, guess = net.describe(images)
    where = presence.bool()
    return (F.binary_cross_entropy_with_logits(logits, presence)
            + 10 * F.mse_loss(guess[where], geometry[where]))


@torch.no_grad()
def accuracy(net, images, presence, geometry, batch=256):
    """(fraction of scenes with all 12 presences right, mean centroid error in pixels)."""
    right, error, count = 0, 0.0, 0
    for i in range(0, len(images), batch):
        logits, guess = net.describe(images[i:i + batch])
        p, g = presence[i:i + batch], geometry[i:i + batch]
        right += ((logits > 0) == p.bool()).all(dim=1).sum().item()
        where = p.bool()
        error += (guess[where][:, :2] - g[where][:, :2]).norm(dim=1).sum().item() * net.config.size
        count += where.sum().item()
    return right / len(images), error / count


def train(config=FeatureConfig(), n_scenes=16384, steps=4000, batch=64, lr=2e-3, seed=0, log=print):
    """A trained LabFeatures: AdamW with a cosine schedule on n_scenes scenes drawn with `seed`."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    images, presence, geometry = scenes(n_scenes, f"features/{seed}")
    log(f"rendered {n_scenes} scenes in {time.perf_counter() - started:.0f}s")
    net = LabFeatures(config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    picks = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(n_scenes, (batch,), generator=picks)
        loss = loss_fn(net, images[idx], presence[idx], geometry[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    return net.eval()


def save(net, path):
    """Write `net` to `path`, a new file, whole or not at all (save_new: Ctrl-C or a full disk leaves none)."""
    if os.path.exists(path):
        raise FolderError(f"{path} exists; choose another --out (nothing is overwritten)")
    data = safetensors_bytes({k: v.contiguous() for k, v in net.state_dict().items()},
                             metadata={CONFIG_KEY: json.dumps(asdict(net.config))})
    save_new(path, lambda f: f.write(data))


def load(path):
    """The LabFeatures saved at `path`, in eval mode."""
    from safetensors import SafetensorError, safe_open
    fix = "train one with python -m lab.features --out FILE, or use the shipped lab/lab-features.safetensors"
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if CONFIG_KEY not in meta:
            raise ValueError(f"{path} is not a lab feature network (no {CONFIG_KEY} in its metadata); {fix}")
        net = LabFeatures(FeatureConfig(**json.loads(meta[CONFIG_KEY])))
        net.load_state_dict(load_file(path))
    except (SafetensorError, OSError, RuntimeError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read as a lab feature network (damaged or truncated: "
                         f"{str(e).splitlines()[0]}); {fix}") from None
    return net.eval()


def main(argv=None):
    p = Parser(prog="python -m lab.features", description=__doc__)
    p.add_argument("--out", required=True, type=path_flag, help="the .safetensors file to write (never overwritten)")
    p.add_argument("--scenes", type=int, default=16384, help="training scenes (16384)")
    p.add_argument("--steps", type=int, default=4000, help="optimiser steps of 64 scenes (4000)")
    p.add_argument("--seed", type=int, default=0, help="scenes, initialisation and batches (0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    for flag, value, least in (("--scenes", args.scenes, 64), ("--steps", args.steps, 1),
                               ("--threads", args.threads, 1)):
        if value is not None and value < least:
            p.error(f"{flag} must be >= {least} ({'a batch is 64 scenes' if flag == '--scenes' else 'a count'}), "
                    f"got {value}")
    if os.path.exists(args.out):
        p.error(f"{args.out} exists; choose another --out (nothing is overwritten)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out}: its folder does not exist; create it or choose another --out")
    set_threads(p, args)   # at most the cores: far above, torch's thread pool crashes the process
    try:
        net = train(n_scenes=args.scenes, steps=args.steps, seed=args.seed)
        right, error = accuracy(net, *scenes(1024, f"features/held-out/{args.seed}"))
        print(f"held-out: presence all right on {right:.1%} of 1024 scenes, centroid error {error:.2f} px")
        save(net, args.out)
    except KeyboardInterrupt:   # the file is written last, whole or not at all (save)
        raise SystemExit(f"interrupted; {args.out} was not written: rerun the same command") from None
    except (FolderError, OSError) as e:   # --out taken meanwhile, a full disk: the line names the file
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
