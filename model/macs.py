"""Analytic multiply-accumulate count of one UNet call, block by block.

Walks the UNet's blocks the way forward() does, with shapes instead of tensors, and counts
convolutions and linear layers (DeepCache's convention, which reproduces its 338.83 G for SD1.5
at 512 px) plus, optionally, the attention matmuls QK^T and AV (2·N·M·C per attention layer).
Norms, activations, softmax and token selection are not counted. Pruning is described by the
number of tokens each sub-layer of each transformer block keeps; caching by the call's depth.

    from model.macs import unet_macs
    per_block = unet_macs(unet, (64, 64))                  # {block name: MACs per sample}
    sum(per_block.values()) / 1e9                          # 338.8 for SD1 without matmuls
"""
import math

import torch.nn as nn

from .unet import Downsample, ResBlock, SpatialTransformer, Upsample


def conv_macs(conv, hw_out):
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return hw_out[0] * hw_out[1] * conv.out_channels * conv.in_channels * k // conv.groups


def transformer_macs(st, hw, context_len, keep, matmuls):
    """keep(st, hw, sub_layer) -> tokens entering that sub-layer of st: "attn1", "kv1" (the tokens
    attn1 takes its keys and values from), "attn2", "ff"."""
    c, n = st.proj_in.out_features if st.linear else st.proj_in.out_channels, hw[0] * hw[1]
    macs = 2 * n * c * c                                          # proj_in, proj_out
    for block in st.transformer_blocks:
        a, kv, x, f = (keep(st, hw, sub) for sub in ("attn1", "kv1", "attn2", "ff"))
        inner, ctx = block.attn1.to_q.out_features, block.attn2.to_k.in_features
        macs += a * c * inner + 2 * kv * c * inner + a * inner * c   # self-attention q, k, v, out
        if x:   # cross-attention (none when its output is read from a cache, T-GATE)
            macs += x * c * inner + 2 * context_len * ctx * inner + x * inner * c
        macs += f * (c * block.ff.net[0].proj.out_features
                     + block.ff.net[2].in_features * c)   # GEGLU, out
        if matmuls:
            macs += 2 * a * kv * inner + 2 * x * context_len * inner
    return macs


def block_macs(block, c_hw, emb_dim, context_len, keep, matmuls, out_size=None):
    """MACs of one TimestepEmbedSequential; c_hw = (channels, h, w) of its input -> (macs, output
    c_hw). out_size: where an Upsample lands (the next skip's size), as in forward()."""
    c, h, w = c_hw
    macs = 0
    for layer in block:
        if isinstance(layer, ResBlock):
            conv1, conv2 = layer.in_layers[2], layer.out_layers[3]
            macs += (conv_macs(conv1, (h, w)) + conv_macs(conv2, (h, w))
                     + emb_dim * conv1.out_channels)
            if isinstance(layer.skip_connection, nn.Conv2d):
                macs += conv_macs(layer.skip_connection, (h, w))
            c = conv1.out_channels
        elif isinstance(layer, SpatialTransformer):
            macs += transformer_macs(layer, (h, w), context_len, keep, matmuls)
        elif isinstance(layer, Downsample):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            macs += conv_macs(layer.op, (h, w))
        elif isinstance(layer, Upsample):
            h, w = out_size or (2 * h, 2 * w)
            macs += conv_macs(layer.conv, (h, w))
        else:   # input_blocks.0: the input conv
            c = layer.out_channels
            macs += conv_macs(layer, (h, w))
    return macs, (c, h, w)


def unet_macs(unet, hw, context_len=77, depth=None, keep=None, matmuls=False):
    """{block name: multiply-accumulates per sample} of one call on an h x w latent.

    depth: the call's cache depth (model.unet.RunState): None for a full call, d for a cached one.
    keep(transformer, (h, w), sub_layer) -> tokens entering that sub-layer (token methods; see
        transformer_macs); default: all h*w. matmuls: count the attention matmuls too.
    """
    keep = keep or (lambda st, grid, sub: grid[0] * grid[1])
    emb_dim = unet.time_embed[0].out_features
    out = {"time_embed": unet.time_embed[0].in_features * emb_dim + emb_dim * emb_dim}
    if unet.config.adm_in_channels:   # SDXL's added conditioning
        out["label_emb"] = unet.config.adm_in_channels * emb_dim + emb_dim * emb_dim
    n = len(unet.output_blocks)
    depth = n if depth is None else depth
    c_hw, skips = (unet.config.in_channels, *hw), []
    for i, block in enumerate(unet.input_blocks[:depth]):
        out[f"input_blocks.{i}"], c_hw = block_macs(block, c_hw, emb_dim, context_len, keep,
                                                    matmuls)
        skips.append(c_hw)
    if depth >= n:
        out["middle_block"], c_hw = block_macs(unet.middle_block, c_hw, emb_dim, context_len, keep,
                                               matmuls)
    elif depth:   # up path starts from a remembered output: first up block's input minus the skip
        joined = unet.output_blocks[n - depth][0].in_layers[2].in_channels
        c_hw = (joined - skips[-1][0], *skips[-1][1:])
    for i in range(n - depth, n):
        skip = skips.pop()
        joined = (c_hw[0] + skip[0], *skip[1:])
        out[f"output_blocks.{i}"], c_hw = block_macs(unet.output_blocks[i], joined, emb_dim,
                                                     context_len, keep, matmuls,
                                                     out_size=skips[-1][1:] if skips else None)
    h, w = hw
    out["out"] = conv_macs(unet.out[2], (h, w))
    return out
