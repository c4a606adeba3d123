"""Stable Diffusion 1.x / 2.x / XL in plain PyTorch: UNet, VAE decoder, CLIP text encoders,
loader."""
from .checkpoint import CheckpointError, StableDiffusion, load_checkpoint, random_weights
from .compile import compile_unet
from .config import MODELS, SD1, SD2, SD2_V, SDXL, TINY, TINY_SD2, TINY_SDXL, SDConfig

__all__ = ["load_checkpoint", "random_weights", "compile_unet", "StableDiffusion",
           "CheckpointError", "SDConfig", "MODELS", "SD1", "SD2", "SD2_V", "SDXL", "TINY",
           "TINY_SD2", "TINY_SDXL"]
