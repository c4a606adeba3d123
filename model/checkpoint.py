"""Load official Stable Diffusion 1.x / 2.x / XL weights into the LDM-named modules.

Accepted: single files (`.safetensors`, memory-mapped; `.ckpt`/`.pt`, read with
`torch.load(weights_only=True)`) such as v1-5-pruned-emaonly.safetensors, sd-v1-4.ckpt,
v2-1_512-ema-pruned.safetensors, v2-1_768-ema-pruned.safetensors, sd_xl_base_1.0.safetensors, and
diffusers-format folders (unet/, vae/, text_encoder/ (+ text_encoder_2/ for SDXL), tokenizer/,
scheduler/). A single file holds (-> attributes of StableDiffusion)

    model.diffusion_model.*                UNet        -> .unet   (prefix stripped)
    first_stage_model.*                    VAE         -> .vae    (decoder part)
    cond_stage_model.transformer.*         SD1 text    -> .text   (transformers layout)
    cond_stage_model.model.*               SD2 text    -> .text   (OpenCLIP, converted)
    conditioner.embedders.0.transformer.*  SDXL CLIP-L -> .text.first
    conditioner.embedders.1.model.*        SDXL bigG   -> .text.second (OpenCLIP, converted)

plus bookkeeping that inference ignores (IGNORED below). Everything else is an error that
names the keys.
"""
import json
import os
import re
import warnings
from dataclasses import dataclass, replace

import torch
from safetensors import safe_open

from .config import (
    MODELS,
    PREDICTIONS,
    SD1,
    SD2,
    SD2_V,
    SDXL,
    TINY,
    TINY_SD2,
    TINY_SDXL,
    SDConfig,
    config_from_json,
)
from .convert import diffusers_unet_to_ldm, diffusers_vae_to_ldm, openclip_to_hf
from .files import CheckpointError, read_state_dict
from .hardware import check_device, resolve_dtype
from .text import DualTextEncoder, TextEncoder
from .unet import UNetModel, added_conditioning
from .vae import AutoencoderKL

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_CLIP, XL_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
# Where each generation's single file keeps its text encoders, in the order of SDConfig.text, text2.
TEXT_PREFIXES = {"sd1": (CLIP,), "sd2": (OPENCLIP,), "sdxl": (XL_CLIP, XL_OPENCLIP)}

# Keys official files carry that inference does not use: the training noise-schedule buffers
# (sampler/schedule.py recomputes them), EMA bookkeeping, the VAE encoder, CLIP's position_ids
# buffer and OpenCLIP's contrastive head.
IGNORED = re.compile(
    r"(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+"
    r"|logvar|lvlb_weights"
    r"|model_ema\.(decay|num_updates)"
    r"|first_stage_model\.(encoder|quant_conv)\..+"
    r"|cond_stage_model\..*position_ids|cond_stage_model\.model\.(text_projection|logit_scale)"
    r"|conditioner\.embedders\.0\..*position_ids|conditioner\.embedders\.1\.model\.logit_scale)")

# told apart by UNet width, context size and added-conditioning width
ARCHITECTURES = (SD1, SD2, SDXL, TINY, TINY_SD2, TINY_SDXL)
CONFIG_KEY, TOKENIZER_KEY = "sd_config", "tokenizer"   # metadata keys that lab/export.py writes


@dataclass
class StableDiffusion:
    unet: UNetModel
    vae: AutoencoderKL
    text: TextEncoder | DualTextEncoder
    config: SDConfig
    source: str = ""   # where the weights came from: a path, or "random weights: <preset>"

    @classmethod
    def build(cls, config, tokenizer=None):
        """The architecture at random init, on the current default device (`meta` skips init)."""
        text = (DualTextEncoder(config.text, config.text2, tokenizer) if config.text2 else
                TextEncoder(config.text, tokenizer))
        return cls(UNetModel(config.unet), AutoencoderKL(config.vae, config.scale_factor), text,
                   config)

    def condition(self, prompts, size, negative=False):
        """What the UNet is conditioned on for `prompts` at image `size` (H, W): the context
        [B, 77, C], or for a UNet with added conditioning (SDXL) a dict of the context and
        y [B, adm_in_channels]: bigG's pooled embedding, then the Fourier embeddings of the original
        size (H, W), the crop's top-left corner (0, 0) and the target size (H, W).
        `negative`: these are the unconditional prompts; an empty one is then the zero text
        embedding where the config says so (SDXL: docs/sdxl.md), the size part stays."""
        context, pooled = self.text.encode(prompts)
        if negative and self.config.force_zeros_for_empty_prompt and not any(prompts):
            context, pooled = (torch.zeros_like(context),
                               pooled if pooled is None else torch.zeros_like(pooled))
        if not self.config.unet.adm_in_channels:
            return context
        ids = torch.tensor([*size, 0, 0, *size],
                           device=pooled.device).repeat(len(prompts), 1)   # [B, 6]
        return {"context": context,
                "y": added_conditioning(pooled, ids, self.config.size_embed_dim)}

    @property
    def device(self):
        return self.unet.out[2].weight.device

    @property
    def dtype(self):
        """The precision the model runs in (its weights')."""
        return self.unet.out[2].weight.dtype

    def to(self, device=None, dtype=None):
        """Move and cast; a VAE with force_upcast (SDXL's overflows in fp16) stays fp32 when the
        rest is fp16."""
        for m in (self.unet, self.vae, self.text):
            upcast = m is self.vae and dtype == torch.float16 and self.config.vae.force_upcast
            m.to(device=device,
                 dtype=torch.float32 if upcast else dtype).eval().requires_grad_(False)
        self.unet.channels_last()   # loaded weights arrive in the file's (NCHW) layout
        return self


def random_weights(config, *, device="cpu", dtype=torch.float32, tokenizer=None, seed=0, name=None):
    """A StableDiffusion with random weights (the same for the same seed): for timing and for
    running the pipeline offline. The global random state is left as it was. `name` (default: the
    architecture's name in MODELS) is recorded in its source."""
    device = check_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StableDiffusion.build(config, tokenizer).to(device, resolve_dtype(dtype, device))
    name = name or next((key for key, preset in MODELS.items() if preset == config), "custom")
    model.source = f"random weights: {name}"
    return model


# ---------------------------------------------------------------------------------------------
# reading files

def _read_component(folder, name):
    """diffusers component weights: the first of
    <folder>/<name>/{diffusion_pytorch_model,model,pytorch_model}[.fp16].{safetensors,bin}."""
    for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
        for variant in ("", ".fp16"):
            for ext in (".safetensors", ".bin"):
                path = os.path.join(folder, name, stem + variant + ext)
                if os.path.isfile(path):
                    return read_state_dict(path)
    raise CheckpointError(f"diffusers folder {folder!r} has no weights in {name}/")


def _read_folder(path):
    """diffusers folder -> (unet, vae, [text encoders' weights]) under our names, and the
    scheduler's prediction type. The renaming depends only on the block structure, read from the
    keys."""
    unet = diffusers_unet_to_ldm(_read_component(path, "unet"))
    vae = diffusers_vae_to_ldm(_read_component(path, "vae"), SD1.vae)
    names = ["text_encoder"] + (
        ["text_encoder_2"] if os.path.isdir(os.path.join(path, "text_encoder_2")) else [])
    text = [{("" if k.startswith(("text_model.", "text_projection.")) else "text_model.") + k: v
             for k, v in _read_component(path, name).items() if not k.endswith("position_ids")}
            for name in names]
    scheduler = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(scheduler):   # no record: SD2 gets guessed from the weights
        return unet, vae, text, None
    with open(scheduler) as f:
        kind = json.load(f).get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{scheduler}: prediction_type {kind!r} is not supported "
                              "(epsilon or v_prediction)")
    return unet, vae, text, {"epsilon": "eps", "v_prediction": "v"}[kind]


# ---------------------------------------------------------------------------------------------
# splitting into components and recognising the architecture

def _split_single_file(state, path):
    """Single-file state dict -> (unet, vae, {text prefix: its keys}), prefixes stripped."""
    if any(k.startswith("conditioner.embedders.0.model.") for k in state):
        raise CheckpointError(f"{path}: this is the SDXL refiner (its only text encoder is "
                              "OpenCLIP bigG); only the SDXL base model is supported")
    unet = _ema_unet(state)
    vae = {k[len(VAE):]: v for k, v in state.items()
           if k.startswith(VAE) and not IGNORED.fullmatch(k)}
    texts = {prefix: {k[len(prefix):]: v for k, v in state.items()
                      if k.startswith(prefix) and not IGNORED.fullmatch(k)}
             for prefix in (CLIP, OPENCLIP, XL_CLIP, XL_OPENCLIP)}
    unknown = [k for k in state
               if not k.startswith((UNET, VAE, *texts, "model_ema.")) and not IGNORED.fullmatch(k)]
    if unknown:
        raise CheckpointError(f"{path}: keys that belong to no SD 1.x/2.x/XL component: "
                              f"{_few(unknown)}")
    return unet, vae, texts


def _text_states(texts, config, path):
    """The file's text-encoder weights in transformers' layout, one per encoder of `config`."""
    wanted = TEXT_PREFIXES[config.version]
    if strays := [p + k for p, keys in texts.items() if p not in wanted for k in keys]:
        raise CheckpointError(f"{path}: text-encoder keys of another SD generation beside a "
                              f"{config.version.upper()} UNet: {_few(strays)}")
    configs = (config.text, config.text2) if config.text2 else (config.text,)
    return [openclip_to_hf(texts[p], c.layers, c.projection) if p in (OPENCLIP, XL_OPENCLIP)
            else texts[p] for p, c in zip(wanted, configs, strict=True)]


def _ema_unet(state):
    """UNet weights, preferring the EMA copy when the file holds both (e.g. v1-5-pruned.ckpt).
    EMA keys are the UNet keys with `model.` dropped and all dots removed."""
    unet = {k[len(UNET):]: v for k, v in state.items() if k.startswith(UNET)}
    ema = {k: state.get("model_ema.diffusion_model" + k.replace(".", "")) for k in unet}
    if unet and all(v is not None for v in ema.values()):
        print("using the EMA weights stored in the checkpoint")
        return ema
    return unet


def _detect(unet, where):
    """The preset whose UNet this state dict is, judged from the input conv, cross-attention and
    added conditioning shapes."""
    conv = unet.get("input_blocks.0.0.weight")
    to_k = next((v for k, v in sorted(unet.items()) if k.endswith(".attn2.to_k.weight")), None)
    if conv is None or to_k is None:
        raise CheckpointError(f"{where}: no Stable Diffusion UNet found (expected "
                              "model.diffusion_model.input_blocks.* keys; found e.g. "
                              f"{_few(unet or ['nothing'])})")
    if conv.shape[1] != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix", 5: "a depth-conditioned"}.get(
            conv.shape[1], "an unknown")
        raise CheckpointError(f"{where}: the UNet takes {conv.shape[1]} input channels, which "
                              f"makes it {kind} model; only text-to-image UNets (4 channels) are "
                              "supported")
    adm = unet["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in unet else 0
    if adm and (conv.shape[0], to_k.shape[1]) == (384, 1280):
        raise CheckpointError(f"{where}: this is the SDXL refiner (384-channel UNet, 1280-wide "
                              "context); only the SDXL base model is supported")
    for config in ARCHITECTURES:
        if (config.unet.model_channels, config.unet.context_dim, config.unet.adm_in_channels) == (
                conv.shape[0], to_k.shape[1], adm):
            return config
    raise CheckpointError(f"{where}: UNet with {conv.shape[0]} base channels, {to_k.shape[1]}-wide "
                          f"context and {adm}-wide added conditioning matches none of SD 1.x "
                          "(320, 768, 0), SD 2.x (320, 1024, 0) and SDXL base (320, 2048, 2816)")


def _guess_prediction(unet, where):
    """SD2 files do not record eps vs v. The heuristic ComfyUI uses: the v models' last transformer
    norm bias is spread wider (std > 0.09) than the 512-base eps model's."""
    bias = unet.get("output_blocks.11.1.transformer_blocks.0.norm1.bias")
    if bias is None:   # an incomplete file: the strict load names what is missing
        return None
    bias = bias.float()
    guess = "v" if bias.std(unbiased=False) > 0.09 else "eps"
    print(f"{where}: SD2 checkpoint, guessed {guess}-prediction"
          f"{' (768 model)' if guess == 'v' else ' (512-base model)'}; "
          "pass prediction='eps'|'v' to override")
    return guess


def _few(keys, n=8):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _load(module, state, what, where, config):
    """Strict load_state_dict that names the missing, unexpected and mis-shaped keys."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
              for k in expected.keys() & state.keys() if state[k].shape != expected[k]]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{where}: the {what} weights do not fit the detected "
                              f"{config.version.upper()} architecture "
                              f"({config.unet.model_channels}-channel UNet, "
                              f"{config.unet.context_dim}-wide context):"
                              + (f"\n  missing: {_few(missing)}" if missing else "")
                              + (f"\n  unexpected: {_few(unexpected)}" if unexpected else "")
                              + (f"\n  wrong shape: {_few(shapes)}" if shapes else ""))
    if broken := [k for k, v in state.items()
                  if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise CheckpointError(f"{where}: the {what} weights hold NaN or inf in {len(broken)} "
                              f"tensor(s) ({_few(broken, 3)}); the file is damaged: download or "
                              "export it again")
    module.load_state_dict(state, strict=True, assign=True)


# ---------------------------------------------------------------------------------------------

def read_metadata(path):
    """The text metadata of a .safetensors file ({} for other files)."""
    if not path.lower().endswith(".safetensors"):
        return {}
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def _stated_config(metadata, path):
    try:
        return config_from_json(metadata[CONFIG_KEY])
    except ValueError as e:
        raise CheckpointError(f"{path}: the {CONFIG_KEY!r} metadata is {e}") from None


def load_checkpoint(path, *, device="cpu", dtype=torch.float32, prediction=None, tokenizer=None):
    """Load an SD 1.x / 2.x / XL checkpoint -> StableDiffusion(unet, vae, text, config).

    path: .safetensors / .ckpt single file or a diffusers folder.
    dtype: "auto" (fp16 on GPUs, bf16 on CPUs with native bf16 units, else fp32; see
        model/hardware.py), or a name or torch dtype: torch.float32 (reference), torch.bfloat16
        (CPUs with AVX512-BF16/AMX, GPUs), torch.float16 (GPUs; SD2 attention is then computed in
        fp32 to avoid black images).
    prediction: "eps" | "v" | None (guess: SD1 is eps; SD2 from the weights, the guess is printed).
    tokenizer: CLIPTokenizer, folder with vocab.json + merges.txt, or hub id; default the diffusers
        folder's tokenizer/, else openai/clip-vit-large-patch14 (downloaded on first use).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"a checkpoint is a file or folder path, got {path!r}")
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    device = check_device(device)   # before reading gigabytes
    path = os.fspath(path)
    if os.path.isdir(path):
        unet, vae, texts, stated = _read_folder(path)
        config = _detect(unet, path)
        texts = texts[:2 if config.text2 else 1]
        if tokenizer is None and os.path.isfile(os.path.join(path, "tokenizer", "vocab.json")):
            tokenizer = os.path.join(path, "tokenizer")
    else:
        unet, vae, texts = _split_single_file(read_state_dict(path), path)
        metadata, stated = read_metadata(path), None
        config = _stated_config(metadata, path) if CONFIG_KEY in metadata else _detect(unet, path)
        texts = _text_states(texts, config, path)
        if tokenizer is None and TOKENIZER_KEY in metadata:   # shipped beside the weights
            tokenizer = os.path.join(os.path.dirname(path), metadata[TOKENIZER_KEY])
    if prediction == "v" and config.version == "sd1":
        warnings.warn(f"{path}: SD 1.x models predict eps; forcing v-prediction (prediction v) "
                      "makes noise", stacklevel=2)
    prediction = prediction or stated or (
        _guess_prediction(unet, path) if config.version == "sd2" else None)
    if prediction not in (None, config.prediction):
        config = SD2_V if config is SD2 else replace(config, prediction=prediction)

    with torch.device("meta"):   # no random init: every tensor comes from the file
        model = StableDiffusion.build(config, tokenizer)
    _load(model.unet, unet, "UNet", path, config)
    _load(model.vae, vae, "VAE", path, config)
    encoders = model.text.encoders
    for n, (encoder, text) in enumerate(zip(encoders, texts, strict=True)):
        _load(encoder.transformer, encoder.adapt_keys(text),
              "text encoder" + (f" {n + 1}" if n else ""), path, config)
        encoder.reset_position_ids()
    model.source = path
    return model.to(device, resolve_dtype(dtype, device))
