"""The VAE of Stable Diffusion (LDM's AutoencoderKL).

Names equal the official keys with `first_stage_model.` stripped (`post_quant_conv.*`,
`decoder.*`). Text-to-image needs only the decoder: the loader skips the official `encoder.*` and
`quant_conv.*` keys, which the lab's training builds (lab/encoder.py). Decoder at 512x512 px: latent
4x64x64 -> conv_in (512 ch) -> mid (ResnetBlock, single-head attention over 4096 positions,
ResnetBlock) -> up.3 ... up.0 (three ResnetBlocks each, x2 nearest upsampling after up.3, up.2,
up.1) -> 3x512x512.
"""
import torch.nn as nn
import torch.nn.functional as F

from .config import VAEConfig


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, h, w] -> [B, 1, h*w, C]
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2)
                   for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (ResnetBlock(channels, channels), AttnBlock(channels),
                                            ResnetBlock(channels, channels))
    return mid


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = mid_block(ch)
        levels = []
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):  # deepest (up.3) built first
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(ch, cfg.ch * mult))
                ch = cfg.ch * mult
            if i:
                level.upsample = Upsample(ch)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):  # up.3 (deepest) runs first
            for block in self.up[i].block:
                h = block(h)
            if i:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The VAE's decoding half; decode(latent) takes the latent as the sampler produces it."""

    def __init__(self, cfg: VAEConfig, scale_factor=0.18215):
        super().__init__()
        self.scale_factor = scale_factor
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def decode(self, latent):
        """[B, z, h, w] sampler latent -> [B, 3, f*h, f*w] image in [-1, 1], clamped
        (f: VAEConfig.factor)."""
        z = latent.to(self.post_quant_conv.weight.dtype) / self.scale_factor
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)
