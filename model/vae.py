"""The VAE of Stable Diffusion (LDM's AutoencoderKL).

Names equal the official keys with `first_stage_model.` stripped (`post_quant_conv.*`,
`decoder.*`, `quant_conv.*`, `encoder.*`). Text-to-image needs only the decoder; the encoder is
built on request (training: lab/), and the loader skips its keys. Decoder at 512x512 px: latent
4x64x64 -> conv_in (512 ch) -> mid (ResnetBlock, single-head attention over 4096 positions,
ResnetBlock) -> up.3 ... up.0 (three ResnetBlocks each, x2 nearest upsampling after up.3, up.2,
up.1) -> 3x512x512. The encoder mirrors it: conv_in -> down.0 ... down.3 (ResnetBlocks, a
stride-2 conv after all but the last) -> mid -> 2 x z_channels (mean and log-variance).
"""
import torch
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
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Stride-2 conv with LDM's asymmetric padding (right and bottom only), so 2h -> h exactly."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(
        channels, channels)
    return mid


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


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = mid_block(ch)
        levels = []
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):  # built deepest first, stored as up.0 ... up.3
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
    """The VAE; decode(latent) takes the latent as the sampler produces it. encoder=True also
    builds the encoder (training), whose encode() gives latents in the sampler's scale."""

    def __init__(self, cfg: VAEConfig, scale_factor=0.18215, encoder=False):
        super().__init__()
        self.scale_factor = scale_factor
        if encoder:
            self.encoder = Encoder(cfg)
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def moments(self, image):
        """[B, 3, H, W] in [-1, 1] -> (mean, logvar) of the posterior over z, each [B, z, H/f, W/f]."""
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)   # LDM's DiagonalGaussianDistribution bounds

    def encode(self, image, generator=None):
        """[B, 3, H, W] in [-1, 1] -> sampler latent (a posterior sample; its mean without a generator)."""
        mean, logvar = self.moments(image)
        if generator is not None:
            mean = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator).to(mean)
        return mean * self.scale_factor

    def decode(self, latent):
        """[B, z, h, w] sampler latent -> [B, 3, f*h, f*w] image in [-1, 1] (clamped; f: VAEConfig.factor)."""
        z = latent.to(self.post_quant_conv.weight.dtype) / self.scale_factor
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)
