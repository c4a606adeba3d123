"""The Stable Diffusion UNet (LDM's openaimodel.UNetModel) in plain PyTorch.

Module names equal the official checkpoint keys with `model.diffusion_model.` stripped, so
`UNetModel(SD1.unet).load_state_dict(official)` needs no renaming table. Layout at 512x512 px
(latent 64x64, SD1 channels):

    input_blocks.0             conv 4 -> 320                       64x64
    input_blocks.1, 2          ResBlock + SpatialTransformer        64x64   (320 ch, 4096 tokens)
    input_blocks.3             Downsample                           -> 32x32
    input_blocks.4, 5          ResBlock + SpatialTransformer        32x32   (640 ch)
    input_blocks.6             Downsample                           -> 16x16
    input_blocks.7, 8          ResBlock + SpatialTransformer        16x16   (1280 ch)
    input_blocks.9             Downsample                           -> 8x8
    input_blocks.10, 11        ResBlock                              8x8
    middle_block               ResBlock + SpatialTransformer + ResBlock
    output_blocks.0-2          ResBlock (+ Upsample in .2)           8x8
    output_blocks.3-5          ResBlock + SpatialTransformer (+ Upsample in .5)
    output_blocks.6-8          ResBlock + SpatialTransformer (+ Upsample in .8)
    output_blocks.9-11         ResBlock + SpatialTransformer        64x64
    out                        GroupNorm, SiLU, conv 320 -> 4

Every output block concatenates the matching input block's output (the skip) on channels.
"""
import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import UNetConfig

ATTENTION_BACKENDS = ("sdpa", "math")


class RunState(Protocol):
    """The contract between UNetModel and an accelerated sampling run (implemented by
    accel.run.AcceleratedRun; the sampler begins and ends each call on it).

    During one UNet call, forward() reads `depth`, the one definition of a cache depth: None for a
    full call, or d in 0 .. n-1 (n = len(output_blocks), 12 on SD1/SD2) for a cached call, which
    recomputes input_blocks[:d] and output_blocks[n-d:] and starts the up path from
    `features[n-1-d]`, the newest remembered result of output_blocks[n-1-d]; the middle block and
    everything deeper is skipped. Depth 0 re-runs only the final `out` layer. forward() hands every
    output-block result it computed to remember() (all n on a full call, the last d on a cached
    one). Each transformer block asks token_plans(x, hw, block, downsamples) for a plan
    (prune/method.py) or None for each of its self-attention, cross-attention and feed-forward;
    `downsamples` counts the x2 downsamplings below the UNet's top transformer level. Each
    transformer block reads its cross-attention output from cross_attention(block) when that is
    not None (T-GATE, accel/gate.py), else computes it and hands it to remember_cross(block, out).
    """
    depth: int | None
    features: list | None

    def remember(self, outputs: list) -> None: ...

    def token_plans(self, x: torch.Tensor, hw: tuple, block: str, downsamples: int) -> tuple: ...

    def cross_attention(self, block: str) -> torch.Tensor | None: ...

    def remember_cross(self, block: str, out: torch.Tensor) -> None: ...


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal timestep embedding [B] -> [B, dim] in fp32, cosine half first (LDM's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def added_conditioning(pooled, ids, width):
    """SDXL's y, what label_emb reads: the pooled text embedding [B, P], then each of the six size
    and crop ids [B, 6] (original H, W; crop top, left; target H, W) Fourier-embedded to `width`
    (256) -> [B, P + 6 * width]."""
    sizes = timestep_embedding(ids.flatten(), width).view(ids.shape[0], -1)
    return torch.cat([pooled, sizes.to(pooled.dtype)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(),
                                       nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        # Index 2 is LDM's Dropout (inactive at inference); kept so the conv is named out_layers.3.
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


def math_attention(q, k, v):
    """Attention that materialises the [B, heads, N, M] score matrix, as LDM (and the papers'
    speed measurements) did. Same result as SDPA up to rounding."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    return scores.softmax(dim=-1) @ v


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given.

    backend: "sdpa" (torch's fused scaled_dot_product_attention, the default) or "math".
    upcast: compute attention in fp32 when the inputs are fp16 (SD2 overflows otherwise).
    """

    def __init__(self, dim, heads, head_dim, context_dim=None, upcast=False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast, self.backend = heads, upcast, "sdpa"
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # LDM: Sequential(Linear, Dropout)

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, _ = x.shape
        # [B, N, heads * d] -> [B, heads, N, d]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        dtype = q.dtype
        if self.upcast and dtype == torch.float16:
            q, k, v = q.float(), k.float(), v.float()
        attend = F.scaled_dot_product_attention if self.backend == "sdpa" else math_attention
        out = attend(q, k, v).transpose(1, 2).reshape(b, n, -1).to(dtype)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)   # in place: one fewer [B, N, 4C] temporary


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # Index 1 is LDM's Dropout; kept so the output projection is named net.2.
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


def run_with_plan(layer, x, plan, *args):
    """Run `layer` on x, or with a token plan: on the kept tokens only, results copied back
    to the pruned positions (prune: [B, N, C] -> [B, N-k, C], recover: [B, N-k, C] -> [B, N, C]);
    or, for self-attention and a plan with `keys_values` (ToDo), with keys and values read from
    keys_values(x) [B, M, C] while every token still queries."""
    if plan is None:
        return layer(x, *args)
    if hasattr(plan, "keys_values"):
        return layer(x, plan.keys_values(x))
    prune, recover = plan
    return recover(layer(prune(x), *args))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim, heads, head_dim, context_dim, upcast=False):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, head_dim, upcast=upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim, upcast=upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.name = ""   # its module path (UNetModel sets it): plans and pictures name blocks by it
        self.downsamples = 0   # set by SpatialTransformer: x2 downsamplings below the top level

    def forward(self, x, context, hw, state=None):
        """x: [B, h*w, C] tokens in row-major grid order; hw = (h, w). state (RunState or None):
        asked for a token plan or None for each of attn1, attn2, ff (run_with_plan), and for the
        gate's kept cross-attention."""
        plans = (state.token_plans(x, hw, self.name, self.downsamples) if state is not None
                 else (None, None, None))
        attn1, attn2, ff = plans
        x = x + run_with_plan(self.attn1, self.norm1(x), attn1)
        cross = state.cross_attention(self.name) if state is not None else None
        if cross is None:
            cross = run_with_plan(self.attn2, self.norm2(x), attn2, context)
            if state is not None:
                state.remember_cross(self.name, cross)
        x = x + cross
        return x + run_with_plan(self.ff, self.norm3(x), ff)


class SpatialTransformer(nn.Module):
    """GroupNorm, project to tokens, `transformer_depth` transformer blocks, project back, residual.

    downsamples: x2 downsamplings below the UNet's top transformer level (0 for SD1's 64x64 blocks
    at 512 px and SDXL's at 1024 px): where token methods act (prune/method.py, max_downsample)."""

    def __init__(self, channels, cfg: UNetConfig, transformer_depth=1, downsamples=0):
        super().__init__()
        heads, head_dim = cfg.heads(channels)
        self.linear, self.downsamples = cfg.linear_proj, downsamples
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        proj = ((lambda: nn.Linear(channels, channels)) if self.linear
                else (lambda: nn.Conv2d(channels, channels, 1)))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, head_dim, cfg.context_dim, cfg.upcast_attention)
             for _ in range(transformer_depth)])
        for block in self.transformer_blocks:
            block.downsamples = downsamples
        self.proj_out = proj()

    def forward(self, x, context, state=None):
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, C, h, w] -> [B, h*w, C]
        if self.linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, (h, w), state)
        if self.linear:
            tokens = self.proj_out(tokens)
        tokens = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)   # back to [B, C, h, w]
        if not self.linear:
            tokens = self.proj_out(tokens)
        return tokens + x


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # `size` is the next skip's size: an odd latent side (e.g. 9 -> 5 going down) must come
        # back to 9, not 10, or the concatenation with the skip fails.
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A block of layers; each gets the inputs it needs (LDM's dispatch by layer type)."""

    def forward(self, x, emb, context, state=None, out_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, state)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels:   # SDXL: pooled text and size/crop ids, added to the time embedding
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))
        top = min(cfg.attention_levels)

        def level_block(cin, cout, level, *extra):
            layers = [ResBlock(cin, cout, emb_dim)]
            if cfg.transformer_depth_at(level):
                layers.append(SpatialTransformer(cout, cfg, cfg.transformer_depth_at(level),
                                                 level - top))
            return TimestepEmbedSequential(*layers, *extra)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(level_block(ch, mult * mc, level))
                ch = mult * mc
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, emb_dim),
            SpatialTransformer(ch, cfg, cfg.transformer_depth_middle,
                               len(cfg.channel_mult) - 1 - top),
            ResBlock(ch, ch, emb_dim))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                up = [Upsample(mult * mc)] if level and i == cfg.num_res_blocks else []
                self.output_blocks.append(
                    level_block(ch + skip_channels.pop(), mult * mc, level, *up))
                ch = mult * mc

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.channels_last()
        for name, module in self.named_modules():
            if isinstance(module, BasicTransformerBlock):
                module.name = name

    def channels_last(self):
        """Store the conv weights channels-last, matching the activations forward() uses."""
        return self.to(memory_format=torch.channels_last)

    def set_attention(self, backend):
        """Choose the attention implementation of every attention layer: "sdpa" or "math"."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; "
                             f"choose one of {ATTENTION_BACKENDS}")
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.backend = backend

    def forward(self, x, t, context, y=None, state: RunState | None = None):
        """x: [B, c, h, w] latent, t: timestep(s) (scalar or [B]), context: [B, 77, C]; y: the added
        conditioning [B, adm_in_channels] of a UNet with label_emb (SDXL: model.checkpoint's
        StableDiffusion.condition builds it), else None. state: the accelerated run (RunState:
        token plans; its depth says which blocks run), or None for the plain SD forward.
        Returns the raw model output (eps or v) [B, c, h, w] in the weights' dtype.
        """
        dtype = self.out[2].weight.dtype   # inputs follow the weights (latents stay fp32)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        if (y is None) != (self.config.adm_in_channels == 0):
            raise ValueError("this UNet takes "
                             f"{'an added conditioning y' if y is None else 'no y'} "
                             f"(adm_in_channels {self.config.adm_in_channels})")
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        n = len(self.output_blocks)
        depth = None if state is None else state.depth
        if depth is not None and not 0 <= depth < n:
            raise ValueError(f"cache depth {depth} does not fit a UNet with {n} output blocks "
                             f"(cached depths: 0 .. {n - 1})")
        depth = n if depth is None else depth

        # Convs run fastest on channels-last (NHWC) tensors, and SpatialTransformer's
        # [B, C, h, w] <-> [B, h*w, C] reshapes are then free views (weights: see channels_last()).
        skips, h = [], x.to(dtype).contiguous(memory_format=torch.channels_last)
        for block in self.input_blocks[:depth]:
            h = block(h, emb, context, state)
            skips.append(h)
        h = (self.middle_block(h, emb, context, state) if depth == n
             else state.features[n - 1 - depth])
        outputs = []
        for block in self.output_blocks[n - depth:]:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, state, out_size=skips[-1].shape[-2:] if skips else None)
            outputs.append(h)
        if state is not None:
            state.remember(outputs)
        return self.out(h).contiguous()
