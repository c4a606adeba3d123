"""SDXL base 1.0: the official keys, the loader, and every component against diffusers (the oracle,
test-only): the UNet with its added conditioning, both text encoders, the VAE, diffusers folders; then
generation with every sampler and method. Tiny widths in the official single-file layout
(conftest.layout_shapes), the full size on the meta device."""
import json

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from accel import PRESETS as ACCEL_PRESETS
from accel import Acceleration
from cache import CacheSchedule
from conftest import UNET, VAE, XL_CLIP, XL_OPENCLIP, layout_shapes, official_shapes, openclip_shapes, random_state
from model import SDXL, TINY_SDXL, CheckpointError, StableDiffusion, load_checkpoint
from model.convert import diffusers_unet_to_ldm, openclip_to_hf
from model.macs import unet_macs
from model.unet import BasicTransformerBlock, added_conditioning
from prune import token_method
from sampler import SAMPLERS
from sampler.generate import Sampling, generate
from tools.measure import diffusers_config
from tools.specs import parse_methods

pytestmark = pytest.mark.usefixtures("one_thread")


def text_configs(config):
    """transformers configurations of the two encoders, as diffusers' text_encoder/ and text_encoder_2/."""
    def make(t):
        return CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp,
                              num_hidden_layers=t.layers, num_attention_heads=t.heads, hidden_act=t.act,
                              projection_dim=t.projection or t.width)
    return make(config.text), make(config.text2)


def load_all(model, state):
    """A strict load into a transformers model, in the installed version's naming (5.x's CLIPTextModel has
    no `text_model.` level); position_ids is a buffer, not a weight."""
    flat = not any(k.startswith("text_model.") for k in model.state_dict())
    model.load_state_dict({(k.removeprefix("text_model.") if flat else k): v for k, v in state.items()
                           if not k.endswith("position_ids")})
    return model.eval()


def their_text(state):
    """CLIP-L and bigG from the official-layout state dict, converted by diffusers' single-file code."""
    first, second = text_configs(TINY_SDXL)
    clip = load_all(CLIPTextModel(first), convert_ldm_clip_checkpoint(state))
    bigg = CLIPTextModelWithProjection(second)
    return clip, load_all(bigg, convert_open_clip_checkpoint(bigg, state, prefix=XL_OPENCLIP))


@pytest.fixture(scope="module")
def state():
    return random_state(layout_shapes(TINY_SDXL))


@pytest.fixture(scope="module")
def checkpoint(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("xl") / "sd_xl_tiny.safetensors"
    save_file(state, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# the official layout, at full size (meta device: no memory, instant)

def test_unet_and_vae_keys_equal_the_official_file():
    official = official_shapes("xl")
    with torch.device("meta"):
        sd = StableDiffusion.build(SDXL)
    ours = {UNET + k: tuple(v.shape) for k, v in sd.unet.state_dict().items()}
    ours.update({VAE + k: tuple(v.shape) for k, v in sd.vae.state_dict().items()})
    expected = {k: v for k, v in official.items() if k.startswith((UNET, VAE))
                and not k.startswith((VAE + "encoder.", VAE + "quant_conv."))}
    assert ours == expected
    assert sum(v.numel() for v in sd.unet.state_dict().values()) == 2_567_463_684   # SDXL base's UNet
    assert (len(sd.unet.input_blocks), len(sd.unet.output_blocks)) == (9, 9)


def test_text_keys_equal_the_official_file():
    official = official_shapes("xl")
    with torch.device("meta"):
        sd = StableDiffusion.build(SDXL)
    first = {(k if k.startswith("text_model.") else "text_model." + k): tuple(v.shape)
             for k, v in sd.text.first.transformer.state_dict().items() if not k.endswith("position_ids")}
    assert first == {k[len(XL_CLIP):]: v for k, v in official.items()
                     if k.startswith(XL_CLIP) and not k.endswith("position_ids")}
    bigg = {k: v for k, v in official.items() if k.startswith(XL_OPENCLIP)}
    assert bigg == openclip_shapes(1280, 32, 5120, prefix=XL_OPENCLIP, projection=1280)
    converted = openclip_to_hf({k[len(XL_OPENCLIP):]: torch.empty(v, device="meta") for k, v in bigg.items()},
                               layers=32, projection=1280)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in sd.text.second.transformer.state_dict().items()}


def test_full_size_unet_is_diffusers_sdxl_unet_renamed():
    """diffusers' SDXL UNet (its unet/config.json settings), renamed by our folder converter, has exactly our
    keys and shapes: 2 and 10 transformer blocks per level, 10 in the middle, label_emb = add_embedding."""
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**diffusers_config(SDXL))
        ours = StableDiffusion.build(SDXL).unet
    renamed = {k: tuple(v.shape) for k, v in diffusers_unet_to_ldm(theirs.state_dict()).items()}
    assert renamed == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# loading, and every component against diffusers

def test_the_single_file_loads_as_sdxl(checkpoint, state):
    sd = load_checkpoint(checkpoint)
    assert sd.config == TINY_SDXL
    for k, v in sd.unet.state_dict().items():
        assert torch.equal(v, state[UNET + k]), k


def test_unet_with_added_conditioning_equals_diffusers(checkpoint, state):
    cfg = diffusers_config(TINY_SDXL)
    theirs = UNet2DConditionModel(**cfg).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(state, cfg))
    ours = load_checkpoint(checkpoint).unet
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 80, generator=g)
    pooled = torch.randn(2, 48, generator=g)
    ids = torch.tensor([[64.0, 96, 0, 0, 64, 96], [1024, 768, 16, 8, 512, 640]])   # a crop: the order matters
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = theirs(x, t, c, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = ours(x, t, c, y=added_conditioning(pooled, ids, TINY_SDXL.size_embed_dim))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    with pytest.raises(ValueError, match="this UNet takes an added conditioning y"):
        ours(x, t, c)


def test_text_encoders_equal_diffusers_pipeline_encoding(checkpoint, state, tokenizer_dir):
    """As diffusers' SDXL pipeline encodes: each encoder's hidden_states[-2] (no final norm), concatenated;
    the pooled embedding is bigG's text_embeds. CLIP-L pads with <|endoftext|>, bigG with id 0 ("!")."""
    sd = load_checkpoint(checkpoint, tokenizer=tokenizer_dir)
    prompts = ["a red cube on a table", "two cats"]
    clip, bigg = their_text(state)
    ids = [CLIPTokenizer.from_pretrained(tokenizer_dir, **kw)(prompts, padding="max_length", max_length=77,
                                                                 return_tensors="pt").input_ids
           for kw in ({}, {"pad_token": "!"})]
    assert ids[1][0, -1] == 0 and ids[0][0, -1] == 49407
    with torch.no_grad():
        first = clip(ids[0], output_hidden_states=True).hidden_states[-2]
        second = bigg(ids[1], output_hidden_states=True)
        context, pooled = sd.text.encode(prompts)
    torch.testing.assert_close(context, torch.cat([first, second.hidden_states[-2]], dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, second.text_embeds, rtol=1e-5, atol=1e-5)


def test_vae_decodes_with_sdxl_scale_as_diffusers(checkpoint, state):
    cfg = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=32)
    theirs = DiffusersVAE(**cfg).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(state, cfg), strict=False)   # no encoder in the file
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(checkpoint).vae.decode(z),
                                   theirs.decode(z / 0.13025).sample.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_a_diffusers_folder_equals_the_single_file(tmp_path, checkpoint, state, tokenizer_dir):
    """unet/, vae/, text_encoder/, text_encoder_2/ (diffusers' own conversions and save_pretrained)."""
    cfg = diffusers_config(TINY_SDXL)
    unet = UNet2DConditionModel(**cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, cfg))
    unet.save_pretrained(tmp_path / "unet")
    vae_cfg = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    vae = DiffusersVAE(**vae_cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_cfg), strict=False)
    vae.save_pretrained(tmp_path / "vae")
    clip, bigg = their_text(state)
    clip.save_pretrained(tmp_path / "text_encoder")
    bigg.save_pretrained(tmp_path / "text_encoder_2")
    (tmp_path / "tokenizer").mkdir()
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizer" / f).write_text(open(f"{tokenizer_dir}/{f}").read())
    folder, single = load_checkpoint(tmp_path), load_checkpoint(checkpoint)
    assert folder.config == single.config == TINY_SDXL
    for a, b in ((folder.unet, single.unet), (folder.vae, single.vae), (folder.text, single.text)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_refiner_is_named_and_refused(tmp_path, state):
    refiner = {k.replace(XL_OPENCLIP, "conditioner.embedders.0.model."): v for k, v in state.items()
               if not k.startswith(XL_CLIP)}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(CheckpointError, match="SDXL refiner"):
        load_checkpoint(tmp_path / "refiner.safetensors")


def test_the_fp16_model_decodes_in_fp32(checkpoint):
    """SDXL's VAE overflows in fp16 (force_upcast): it stays fp32 when the rest runs in fp16."""
    sd = load_checkpoint(checkpoint, dtype=torch.float16)
    assert sd.unet.out[2].weight.dtype == torch.float16 and sd.vae.post_quant_conv.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# generation and the methods on SDXL

@pytest.fixture(scope="module")
def sd(checkpoint, tokenizer_dir):
    return load_checkpoint(checkpoint, tokenizer=tokenizer_dir)


def test_token_methods_act_on_the_top_transformer_level():
    """max_downsample 1 means SDXL's 64x64 level at 1024 px (level 0 of its transformers, the latent's
    level 1): 2 transformer blocks in each of input_blocks 4, 5 and output_blocks 3, 4, 5."""
    with torch.device("meta"):
        unet = StableDiffusion.build(SDXL).unet
    top = {b.name for b in unet.modules() if isinstance(b, BasicTransformerBlock) and b.downsamples == 0}
    assert top == {f"{blk}.1.transformer_blocks.{i}" for blk in ("input_blocks.4", "input_blocks.5", "output_blocks.3",
                                                                 "output_blocks.4", "output_blocks.5") for i in (0, 1)}
    grids = {}
    unet_macs(unet, (128, 128), keep=lambda st, grid, sub: grids.setdefault(st.downsamples, grid) and 0)
    assert grids == {0: (64, 64), 1: (32, 32)}   # 4096 tokens, as SD 1.5's top level at 512 px


def test_an_empty_negative_prompt_is_the_zero_text_embedding(sd):
    """SDXL's reference pipelines: the unconditional text embedding (context and pooled) of no negative
    prompt is zero; the size/crop part of y stays. A negative prompt, or an empty conditional one, is encoded."""
    uncond = sd.condition(["", ""], (64, 96), negative=True)
    sizes = added_conditioning(torch.zeros(2, 48), torch.tensor([[64, 96, 0, 0, 64, 96]] * 2), 16)
    assert uncond["context"].abs().max() == 0 and torch.equal(uncond["y"], sizes)
    assert sd.condition(["blurry"], (64, 96), negative=True)["context"].abs().max() > 0
    assert sd.condition([""], (64, 96))["context"].abs().max() > 0


def pixels(image):
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float()


@pytest.mark.parametrize("spec", ["tome:0.5", "sito:0.5", "dato:0.5", "todo:2", "deepcache-n3", "dato-fixed",
                                  "sito and deepcache"])
def test_every_method_runs_on_sdxl_and_acts(sd, spec):
    """Each changes the image (pruning acts on the top transformer level, caching skips blocks) and the
    record names it; the DaTo preset is for PLMS-50."""
    steps = 50 if spec == "dato-fixed" else 4
    if spec == "sito and deepcache":
        accel = Acceleration(token_method("sito"), ACCEL_PRESETS["deepcache-n3"].cache)
    else:
        accel = parse_methods(spec, "plms", steps)[spec].accel
    base = generate(sd, "a cat", Sampling(steps=steps, seed=1))[0]
    image = generate(sd, "a cat", Sampling(steps=steps, seed=1, accel=accel))[0]
    assert (pixels(image) - pixels(base)).abs().mean() > 0.1
    assert json.loads(image.info["parameters"])["model"] == "sdxl"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_on_sdxl(sd, sampler):
    images = generate(sd, ["a cat", "a dog"], Sampling(steps=3, sampler=sampler, size=(64, 96), batch_size=2))
    assert [im.size for im in images] == [(96, 64)] * 2


def test_cache_depths_beyond_the_nine_output_blocks_are_refused(sd):
    with pytest.raises(ValueError, match="cache depth 10 does not fit this UNet's 9 output blocks"):
        generate(sd, "x", Sampling(steps=4, accel=Acceleration(cache=CacheSchedule("uniform", interval=2, depth=10))))
    generate(sd, "x", Sampling(steps=4, accel=Acceleration(cache=CacheSchedule("uniform", interval=2, depth=8))))
