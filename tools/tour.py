"""The pictures of docs/tour.md: one prompt followed through the code on the lab model, a picture per stop.

    python -m tools.tour --ckpt lab/lab-sd.safetensors --out docs/tour   # about a minute on 2 CPU cores
    python -m tools.tour --links   # after editing the code: docs/tour.md's links follow the functions they name

Writes, for the prompt "a red circle to the left of a blue square", seed 45, PLMS-50 (sample.py's default run):
tokens.png (the tokens and the context they become), noise.png (x_T, one tile per latent channel), x0.png (the
predicted clean image every 5 steps), tokens-sito-dato-tome.png (which tokens each method keeps, takes as base and
prunes, at the same block and UNet call), dynamics.png (DaTo's dynamics map at that call), cache.png (two cache
schedules, call by depth) and image.png (the final image).
"""
import ast
import os
import re
import tempfile

import torch
from PIL import Image, ImageDraw

from accel import PRESETS, Acceleration
from model import load_checkpoint
from prune import token_method
from prune.dato import dynamics_map
from prune.viz import PruneViz
from sampler import sample_steps, unet_calls
from sampler.cli import Parser, run_tool
from sampler.generate import Sampling, generate, to_pil

PROMPT = "a red circle to the left of a blue square"
SEED = 45   # one the lab model draws right (it places two objects right about 60% of the time)
BLOCK = "input_blocks.1.1.transformer_blocks.0"   # the first transformer block, at the latent's full grid
CALL = 25   # the UNet call whose token plans and dynamics are shown: mid-run of PLMS-50's 51
SCALE = 4   # pixels per latent position or token in the pictures


def tiles(tensors, scale=SCALE, gap=4):
    """Grey-scale tiles of 2-D tensors side by side, each stretched to its own min..max."""
    pictures = []
    for t in tensors:
        t = (t - t.min()) / (t.max() - t.min() + 1e-12)
        pictures.append(Image.fromarray((t * 255).byte().numpy()).resize((t.shape[1] * scale, t.shape[0] * scale),
                                                                         Image.NEAREST))
    return side_by_side(pictures, gap)


def side_by_side(pictures, gap=4, captions=None):
    band = 14 if captions else 0
    sheet = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(pictures) - 1),
                              band + max(p.height for p in pictures)), "white")
    x = 0
    for k, picture in enumerate(pictures):
        sheet.paste(picture, (x, band))
        if captions:
            ImageDraw.Draw(sheet).text((x + 2, 1), captions[k], fill="black")
        x += picture.width + gap
    return sheet


def tokens_picture(sd):
    """The prompt's tokens (their ids and text) above the context [positions, width] they become."""
    ids = sd.text.tokenize([PROMPT])[0].tolist()
    words = sd.text.tokenizer.convert_ids_to_tokens(ids)
    context = sd.condition([PROMPT], (sd.config.image_size,) * 2)[0].float()
    heat = tiles([context], scale=3)   # a row per position
    sheet = Image.new("RGB", (max(heat.width, 560), heat.height + 16 * len(ids) // 4 + 20), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (i, word) in enumerate(zip(ids, words, strict=True)):
        draw.text((4 + 140 * (k % 4), 2 + 16 * (k // 4)), f"{k:2d}: {i} {word.replace('</w>', '')}", fill="black")
    sheet.paste(heat, (0, 20 + 16 * len(ids) // 4))
    return sheet


def run_pictures(sd, out):
    """x_T, the predicted x0 strip of the plain run (as generate() draws x_T and samples), and DaTo's dynamics
    map at CALL from its raw UNet outputs."""
    side = sd.config.image_size // sd.config.vae.factor
    shape = (sd.config.vae.z_channels, side, side)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))[None]
    tiles(list(x_T[0])).save(os.path.join(out, "noise.png"))
    raw = []

    def unet(x, t, context):
        raw.append(sd.unet(x, t, context))
        return raw[-1]
    size = (sd.config.image_size,) * 2
    cond, uncond = sd.condition([PROMPT], size), sd.condition([""], size, True)
    strip = []
    for step in sample_steps(unet, x_T, cond, uncond, steps=50, scale=sd.config.guidance, method="plms"):
        if step.index % 5 == 4:
            strip.append(to_pil(sd.vae.decode(step.pred_x0))[0])
    side_by_side(strip, captions=[f"step {5 * k + 5}" for k in range(len(strip))]).save(os.path.join(out, "x0.png"))
    dynamics = dynamics_map(raw[CALL - 2], raw[CALL - 1])   # what DaToRun.begin_call computes for CALL
    tiles([dynamics[-1]], scale=SCALE).save(os.path.join(out, "dynamics.png"))


def token_plans(sd, out):
    """Each of SiTo, DaTo and ToMe at ratio 0.5 on the same run: its plan of BLOCK at CALL (PruneViz's colours:
    grey kept, red base, black pruned)."""
    pictures = []
    with tempfile.TemporaryDirectory() as folder:
        for name in ("sito", "dato", "tome"):
            viz = PruneViz(os.path.join(folder, name), BLOCK, cell=SCALE)
            generate(sd, [PROMPT], Sampling(seed=SEED, accel=Acceleration(token_method(name, ratio=0.5), viz=viz)))
            pictures.append(Image.open(os.path.join(folder, name, f"seed{SEED}_call{CALL:03d}.png")).convert("RGB"))
    sheet = side_by_side(pictures, gap=8, captions=["SiTo", "DaTo", "ToMe"])
    sheet.save(os.path.join(out, "tokens-sito-dato-tome.png"))


def cache_chart(out, presets=("deepcache-n3", "dato-coco"), bar=3, height=40):
    """Each preset's cache depth per UNet call of PLMS-50 (12, full: a full bar; 0: every block reused)."""
    calls = unet_calls(50, "plms")
    sheet = Image.new("RGB", (calls * bar + 120, len(presets) * (height + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(presets):
        top = row * (height + 8)
        draw.text((calls * bar + 6, top + height // 2 - 6), name, fill="black")
        for call, depth in enumerate(PRESETS[name].acceleration().depths(calls)):
            y = top + height - max(1, round(height * depth / 12))
            draw.rectangle((call * bar, y, call * bar + bar - 2, top + height), fill=(60, 90, 200))
    sheet.save(os.path.join(out, "cache.png"))


LINK = re.compile(r"\[`(?:[\w/.]+`: `)?([\w.]+)`\]\(\.\./([\w/.]+)#L(\d+)-L(\d+)\)")   # [`file`: `name`](../file#La-Lb)


def function(path, name):
    """The ast node of the def `name` (dotted: Class.method, outer.inner) in the file `path`."""
    with open(path) as f:
        nodes = ast.parse(f.read()).body
    for part in name.split("."):
        node = next(n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
        nodes = node.body
    return node


def link_lines(path, name):
    """(first, last) line a tour link to `name` shows: the whole def, or past its docstring if over 40 lines."""
    node = function(path, name)
    first = node.lineno
    if node.end_lineno - first >= 40 and isinstance(node.body[0], ast.Expr):
        first = node.body[1].lineno
    return first, node.end_lineno


def refresh_links(tour, root):
    """Rewrite the code links of the tour file `tour` to the current lines of the functions they name."""
    with open(tour) as f:
        text = f.read()

    def current(m):
        first, last = link_lines(os.path.join(root, m.group(2)), m.group(1))
        return m.group(0).replace(f"#L{m.group(3)}-L{m.group(4)})", f"#L{first}-L{last})")
    with open(tour, "w") as f:
        f.write(LINK.sub(current, text))


def run(args):
    if args.links:
        return refresh_links(os.path.join(os.path.dirname(args.out), "tour.md"), ".")
    os.makedirs(args.out, exist_ok=True)
    sd = load_checkpoint(args.ckpt)   # fp32 on the CPU: the same pictures on every machine
    with torch.inference_mode():
        tokens_picture(sd).save(os.path.join(args.out, "tokens.png"))
        run_pictures(sd, args.out)
        token_plans(sd, args.out)
        generate(sd, [PROMPT], Sampling(seed=SEED))[0].save(os.path.join(args.out, "image.png"))
    cache_chart(args.out)
    print(f"the tour's pictures are in {args.out}/")


def main(argv=None):
    p = Parser(prog="python -m tools.tour", description=__doc__)
    p.add_argument("--ckpt", default="lab/lab-sd.safetensors", help="the model (lab/lab-sd.safetensors)")
    p.add_argument("--out", default="docs/tour", help="folder for the pictures, written over (docs/tour)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--links", action="store_true", help="only rewrite the code links of tour.md (beside --out) to "
                   "the current lines of the functions they name, after the code moved")
    run_tool(p, run, argv)


if __name__ == "__main__":
    main()
