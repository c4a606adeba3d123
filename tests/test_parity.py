"""Numerical parity with an independent oracle at full size: diffusers converts the same
official-layout checkpoint with its own single-file code, and its UNet2DConditionModel,
AutoencoderKL and CLIPTextModel must compute what ours compute (fp32, CPU).

One random-weight checkpoint per SD generation is written in the official layout (about 4 GB)
and loaded by both sides; these are the slowest tests of the suite (about a minute each)."""
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from conftest import official_shapes, random_state
from model import SD1, SD2, load_checkpoint

pytestmark = pytest.mark.slow   # full-size models: GBs of memory, about a minute each


def ldm_config(version):
    """The parts of LDM's v1-inference.yaml / v2-inference.yaml that diffusers reads."""
    unet = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], transformer_depth=1)
    unet.update(dict(num_heads=8, context_dim=768) if version == "v1" else
                dict(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024))
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    return {"model": {"params": {"scale_factor": 0.18215, "unet_config": {"params": unet},
                                 "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": ddconfig}}}}}


@pytest.fixture(scope="module", params=["v1", "v2"])
def pair(request, tmp_path_factory):
    """(our StableDiffusion, diffusers' (unet, vae, text model)) from one official-layout file."""
    version = request.param
    path = str(tmp_path_factory.mktemp("ckpt") / f"sd-{version}.safetensors")
    save_file(random_state(official_shapes(version), seed=1), path)
    ours = load_checkpoint(path, prediction="eps")
    state, original = load_file(path), ldm_config(version)

    unet_config = create_unet_diffusers_config_from_ldm(original, state, image_size=512)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet_config), assign=True)

    vae_config = create_vae_diffusers_config_from_ldm(original, state, image_size=512)
    with torch.device("meta"):
        vae = DiffusersVAE(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config), assign=True)

    if version == "v1":
        text_config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, hidden_act="quick_gelu")   # clip-vit-large-patch14
        text_state = convert_ldm_clip_checkpoint(state)
    else:   # diffusers' SD2 text encoder: 23 layers of the OpenCLIP tower
        text_config = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                     num_attention_heads=16, hidden_act="gelu", projection_dim=1024)
        text_state = convert_open_clip_checkpoint(CLIPTextModel(text_config), state)
    text = CLIPTextModel(text_config)
    flat = not any(k.startswith("text_model.") for k in text.state_dict())   # transformers 5 layout
    text.load_state_dict({(k.removeprefix("text_model.") if flat else k): v for k, v in text_state.items()
                          if "text_projection" not in k and "position_ids" not in k}, strict=True)
    del state   # the file's tensors: each side holds its own copy now
    yield ours, (unet.eval(), vae.eval(), text.eval())


def close(ours, theirs, tol=1e-4):
    """max |ours - theirs| <= tol * max |theirs| (relative to the output's scale)."""
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} vs output scale {scale:.3g}"


@pytest.mark.parametrize("hw", [(16, 16), (9, 13)], ids=["16x16", "9x13"])
@torch.no_grad()
def test_unet(pair, hw):
    ours, (unet, _, _) = pair
    width = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, *hw, generator=g), torch.randn(2, 77, width, generator=g)
    t = torch.tensor([981, 1])
    close(ours.unet(x, t, context), unet(x, t, context).sample)


@torch.no_grad()
def test_vae_decoder(pair):
    ours, (_, vae, _) = pair
    latent = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(0))
    theirs = vae.decode(latent / 0.18215).sample
    close(ours.vae.decoder(ours.vae.post_quant_conv(latent / 0.18215)), theirs)
    assert torch.equal(ours.vae.decode(latent), ours.vae.decode(latent).clamp(-1, 1))


@torch.no_grad()
def test_text_encoder(pair, tokenizer_dir):
    ours, (_, _, text) = pair
    ours.text._tokenizer = tokenizer_dir
    prompts = ["the cat", "a photo of the cat of the cat"]
    ids = ours.text.tokenize(prompts)
    pad = 49407 if ours.config.version == "sd1" else 0
    assert ids.shape == (2, 77) and ids[0, 4:].eq(pad).all() and ids[:, 0].eq(49406).all()
    close(ours.text(prompts), text(input_ids=ids).last_hidden_state)


def test_detected_configs(pair):
    ours, _ = pair
    assert ours.config in (SD1, SD2)
    assert ours.config.unet.context_dim == pair[1][0].config.cross_attention_dim
