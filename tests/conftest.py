"""Shared test helpers: checkpoints in the official layout with random weights, and a small
CLIP tokenizer written to disk (no downloads anywhere in the tests)."""
import json
import math
from pathlib import Path

import pytest
import torch

from model import TINY, StableDiffusion
from model.text import write_tokenizer
from model.unet import UNetModel

KEYS = Path(__file__).parent / "keys"   # official key names and shapes (../shared/checkpoint-keys)
UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_CLIP, XL_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


def official_shapes(version):
    """{key: shape} of the official single file: version "v1" (SD 1.x), "v2" (SD 2.x) or "xl" (SDXL base)."""
    return {k: tuple(v) for k, v in json.loads((KEYS / f"sd-{version}.json").read_text()).items()}


def openclip_shapes(width, layers, mlp, vocab=49408, length=77, prefix=OPENCLIP, projection=None):
    """{key: shape} of an OpenCLIP text tower under `prefix` (SD2's cond_stage_model.model., SDXL's
    conditioner.embedders.1.model.); its text_projection is [width, projection (default width)]."""
    shapes = {"token_embedding.weight": (vocab, width), "positional_embedding": (length, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,),
              "text_projection": (width, projection or width), "logit_scale": ()}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
            p + "mlp.c_fc.weight": (mlp, width), p + "mlp.c_fc.bias": (mlp,),
            p + "mlp.c_proj.weight": (width, mlp), p + "mlp.c_proj.bias": (width,)})
    return {prefix + k: v for k, v in shapes.items()}


def layout_shapes(config):
    """{key: shape} of an official-layout single file for any preset (the tiny ones included):
    UNet and VAE decoder from our modules (whose names the key-coverage test checks against the
    official lists), the text encoder in the file's own layout (transformers for SD1, OpenCLIP
    with one extra block for SD2)."""
    with torch.device("meta"):
        sd = StableDiffusion.build(config)
    shapes = {UNET + k: tuple(v.shape) for k, v in sd.unet.state_dict().items()}
    shapes.update({VAE + k: tuple(v.shape) for k, v in sd.vae.state_dict().items()})
    t = config.text
    if config.version == "sd2":
        shapes.update(openclip_shapes(t.width, t.layers + 1, t.mlp))
    else:   # SD1's CLIP, or SDXL's first encoder (CLIP-L), in transformers' layout
        prefix = XL_CLIP if config.text2 else CLIP
        for k, v in sd.text.encoders[0].transformer.state_dict().items():
            k = k if k.startswith("text_model.") else "text_model." + k
            shapes[prefix + k] = tuple(v.shape)
        shapes[prefix + "text_model.embeddings.position_ids"] = (1, t.max_length)
    if t2 := config.text2:   # SDXL's OpenCLIP bigG, every layer kept
        shapes.update(openclip_shapes(t2.width, t2.layers, t2.mlp, prefix=XL_OPENCLIP, projection=t2.projection))
    shapes.update({"betas": (1000,), "alphas_cumprod": (1000,)})
    return shapes


def tiny_unet(config=TINY, seed=0):
    """A small UNet with reproducible random weights, in eval mode without gradients."""
    torch.manual_seed(seed)
    return UNetModel(config.unet).eval().requires_grad_(False)


def random_state(shapes, seed=0, dtype=torch.float32):
    """Random weights for a {key: shape} layout, scaled so activations stay O(1) through the
    network: matrices ~ N(0, 1/fan_in), 1-D weights (norm scales) ~ 1 + N(0, 0.01), biases ~ N(0, 0.01)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            out[key] = torch.arange(shape[-1]).expand(shape).clone()
            continue
        t = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            t /= math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):
            t = 1 + 0.1 * t
        else:
            t *= 0.1
        out[key] = t.to(dtype)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """For modules of small tensors on a shared 2-core machine (pytestmark = usefixtures): a second torch
    thread only waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A CLIP BPE tokenizer folder with the real special-token ids and a few merges:
    "the cat" -> [49406, 514, 516, 49407]."""
    merges = [("p", "h"), ("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("o", "f</w>")]
    return write_tokenizer(str(tmp_path_factory.mktemp("tokenizer")), merges)
