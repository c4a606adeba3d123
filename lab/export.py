"""The lab model's checkpoint file: its weights in the official SD 1.x single-file layout, with its SDConfig and
tokenizer folder in the metadata, so model.load_checkpoint reads it like any SD file and needs no detection."""
import os

import torch
from safetensors.torch import save_file

from model.checkpoint import CLIP, CONFIG_KEY, TOKENIZER_KEY, UNET, VAE
from model.config import config_to_json


def save_checkpoint(sd, path, *, dtype=torch.float16, tokenizer=None):
    """Write `sd` as one .safetensors file in the official SD 1.x single-file layout
    (model.diffusion_model.*, first_stage_model.* with the encoder if built, cond_stage_model.*),
    its SDConfig in the metadata so load_checkpoint needs no detection; `tokenizer`: a folder name
    relative to the file, recorded for loading. Floating tensors are stored in `dtype`
    (fp16: half the size). Never overwrites: an existing `path` is an error."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose another name (checkpoints are never overwritten)")
    state, metadata = checkpoint_state(sd, dtype=dtype, tokenizer=tokenizer)
    save_file(state, path, metadata=metadata)
    return path


def checkpoint_state(sd, *, dtype=torch.float16, tokenizer=None):
    """(state dict, metadata) that save_checkpoint writes."""
    if sd.config.version != "sd1":
        raise ValueError("save_checkpoint writes the SD 1.x layout (a CLIP text encoder); this model is "
                         f"{sd.config.version}")
    state = {UNET + k: v for k, v in sd.unet.state_dict().items()}
    state.update({VAE + k: v for k, v in sd.vae.state_dict().items()})
    state.update({CLIP + (k if k.startswith("text_model.") else "text_model." + k): v
                  for k, v in sd.text.transformer.state_dict().items() if not k.endswith("position_ids")})
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    metadata = {CONFIG_KEY: config_to_json(sd.config)}
    if tokenizer is not None:
        metadata[TOKENIZER_KEY] = tokenizer
    return state, metadata
