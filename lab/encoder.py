"""The VAE's encoder, which only training needs: LDM's `first_stage_model.encoder` and `quant_conv`.

Text-to-image decodes and never encodes, so model/vae.py builds the decoder alone and the loader skips
these keys; the lab trains the whole autoencoder (lab.train's vae stage), encodes its UNet's training
latents and measures reconstructions (lab.recon). The encoder mirrors the decoder: conv_in -> down.0 ...
down.3 (ResnetBlocks, a stride-2 conv after all but the last) -> mid -> 2 x z_channels (mean and
log-variance of the posterior over z).
"""
import torch.nn as nn
import torch.nn.functional as F

from model.config import VAEConfig
from model.vae import AutoencoderKL, Normalize, ResnetBlock, mid_block


class Downsample(nn.Module):
    """Stride-2 conv with LDM's asymmetric padding (right and bottom only), so 2h -> h exactly."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_ch, cfg.ch, 3, padding=1)
        ch, levels = cfg.ch, []
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(ch, cfg.ch * mult))
                ch = cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(ch)
            levels.append(level)
        self.down = nn.ModuleList(levels)
        self.mid = mid_block(ch)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)   # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class TrainableVAE(AutoencoderKL):
    """The whole autoencoder, encoder too: every official first_stage_model key. At scale 1 by default,
    as trained (the latent scale is measured afterwards, lab.train's latents stage)."""

    def __init__(self, cfg: VAEConfig, scale_factor=1.0):
        super().__init__(cfg, scale_factor)
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def moments(self, image):
        """[B, 3, H, W] in [-1, 1] -> (mean, logvar) of the posterior over z, each [B, z, H/f, W/f]."""
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)   # LDM's DiagonalGaussianDistribution bounds
