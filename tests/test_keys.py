"""Key coverage: the modules built from the presets have exactly the official key names and
shapes (tests/keys/*.json are the lists from the official single files), minus the extras the
loader deliberately skips. Built on the meta device, so this is instant."""
import re

import pytest
import torch

from conftest import CLIP, OPENCLIP, UNET, VAE, official_shapes, openclip_shapes
from lab.encoder import TrainableVAE
from model import SD1, SD2, StableDiffusion
from model.config import VAEConfig
from model.convert import openclip_to_hf

# What inference does not use, spelled out here independently of the loader's own list.
EXTRAS = re.compile(
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|first_stage_model\.encoder\..*|first_stage_model\.quant_conv\..*"
    r"|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids"
    r"|cond_stage_model\.model\.(text_projection|logit_scale|transformer\.resblocks\.23\..*))")


def text_keys(sd):
    """Our text encoder's keys in the transformers-4 naming (`text_model.` prefix)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): tuple(v.shape)
            for k, v in sd.text.transformer.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("config,version", [(SD1, "v1"), (SD2, "v2")])
def test_unet_and_vae_keys_equal_official(config, version):
    official = {k: v for k, v in official_shapes(version).items() if not EXTRAS.fullmatch(k)}
    with torch.device("meta"):
        sd = StableDiffusion.build(config)
    ours = {UNET + k: tuple(v.shape) for k, v in sd.unet.state_dict().items()}
    ours.update({VAE + k: tuple(v.shape) for k, v in sd.vae.state_dict().items()})
    expected = {k: v for k, v in official.items() if k.startswith((UNET, VAE))}
    assert ours == expected
    assert sum(v.numel() for v in sd.unet.state_dict().values()) == (859_520_964 if version == "v1" else 865_910_724)


def test_sd1_text_keys_equal_official():
    official = {k[len(CLIP):]: v for k, v in official_shapes("v1").items()
                if k.startswith(CLIP) and not EXTRAS.fullmatch(k)}
    with torch.device("meta"):
        sd = StableDiffusion.build(SD1)
    assert text_keys(sd) == official


def test_sd2_text_keys_equal_converted_official():
    """The OpenCLIP tower converts onto our 23-layer CLIPTextModel with nothing missing or left over."""
    official = {k: v for k, v in official_shapes("v2").items() if k.startswith(OPENCLIP)}
    assert official == openclip_shapes(1024, 24, 4096)   # the helper the tiny SD2 files are built with
    converted = openclip_to_hf({k[len(OPENCLIP):]: torch.empty(v, device="meta") for k, v in official.items()},
                               layers=SD2.text.layers)
    with torch.device("meta"):
        sd = StableDiffusion.build(SD2)
    assert {k: tuple(v.shape) for k, v in converted.items()} == text_keys(sd)


@pytest.mark.parametrize("config,version", [(SD1, "v1"), (SD2, "v2")])
def test_vae_with_encoder_equals_the_official_first_stage(config, version):
    """The VAE the lab trains (lab.encoder.TrainableVAE) covers every official first_stage_model key
    with its shape: encoder, quant_conv, post_quant_conv, decoder."""
    official = {k: v for k, v in official_shapes(version).items() if k.startswith(VAE)}
    with torch.device("meta"):
        vae = TrainableVAE(config.vae)
    assert {VAE + k: tuple(v.shape) for k, v in vae.state_dict().items()} == official


def test_encoder_inverts_the_factor():
    vae = TrainableVAE(VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1))
    mean, logvar = vae.moments(torch.zeros(2, 3, 40, 24))
    assert mean.shape == logvar.shape == (2, 4, 10, 6) and vae.decode(mean).shape == (2, 3, 40, 24)
