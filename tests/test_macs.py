"""The analytic MAC counter against counting hooks on the real modules, and DeepCache's number."""
import pytest
import torch
import torch.nn as nn

from accel import Acceleration
from cache import FULL, CacheSchedule
from conftest import tiny_unet
from model import SD1, TINY, TINY_SD2, TINY_SDXL
from model.macs import unet_macs
from model.unet import CrossAttention, UNetModel
from prune import token_method


def hooked_macs(unet, x, context, accel=None, y=None):
    """MACs per sample and top-level block, counted from the shapes each module really sees."""
    counts = {}

    def add(name, value):
        parts = name.split(".")
        block = ".".join(parts[:2]) if name.startswith(("input_blocks", "output_blocks")) else parts[0]
        counts[block] = counts.get(block, 0) + value // x.shape[0]

    for name, m in unet.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, a, out, name=name: add(
                name, out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups))
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(lambda m, a, out, name=name: add(name, out.numel() * m.in_features))
        elif isinstance(m, CrossAttention):   # QK^T and AV: 2 * N * M * inner
            m.register_forward_hook(lambda m, a, out, name=name: add(name, 2 * a[0].shape[0] * a[0].shape[1] * (
                a[1] if len(a) > 1 else a[0]).shape[1] * m.to_q.out_features))
    with torch.no_grad():
        unet(x, 500, context, y=y, state=accel)
    return counts


def analytic(unet, hw, **kw):
    return unet_macs(unet, hw, matmuls=True, **kw)


@pytest.mark.parametrize("config", [TINY, TINY_SD2, TINY_SDXL], ids=["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("hw", [(16, 12), (9, 13)])
def test_full_call_matches_hooks(config, hw):
    unet = tiny_unet(config)
    x, c = torch.randn(2, 4, *hw), torch.randn(2, 77, config.unet.context_dim)
    y = torch.randn(2, config.unet.adm_in_channels) if config.unet.adm_in_channels else None
    assert analytic(unet, hw) == hooked_macs(unet, x, c, y=y)


@pytest.mark.parametrize("depth", [0, 1, 2, 5, 11])
def test_cached_call_matches_hooks(depth):
    unet = tiny_unet()
    x, c = torch.randn(2, 4, 16, 12), torch.randn(2, 77, 32)
    state = Acceleration(cache=CacheSchedule("dato", depths=(FULL, depth))).start(2, 0)
    state.begin_call(0, x)
    unet(x, 500, c, state=state)
    state.begin_call(1, x)
    counted = hooked_macs(unet, x, c, state)
    assert analytic(unet, (16, 12), depth=depth) == counted
    assert "middle_block" not in counted


@pytest.mark.parametrize("layers", [("attn1",), ("attn1", "attn2", "ff")])
def test_pruned_call_matches_hooks(layers):
    unet = tiny_unet()
    x, c = torch.randn(2, 4, 16, 12), torch.randn(2, 77, 32)
    prune = token_method("sito", ratio=0.6, max_downsample=2, layers=layers)
    state = Acceleration(prune).start(1, 0)
    state.begin_call(0, x)

    def keep(st, grid, sub):   # "kv1": the tokens attn1 takes keys and values from, attn1's own here
        n = grid[0] * grid[1]
        return n - int(n * 0.6) if sub.replace("kv1", "attn1") in layers and grid in ((16, 12), (8, 6)) else n

    assert analytic(unet, (16, 12), keep=keep) == hooked_macs(unet, x, c, state)


@pytest.mark.parametrize("factor", [2, 3])
def test_todo_call_matches_hooks(factor):
    """ToDo: only to_k and to_v of self-attention see fewer tokens, (h // f) * (w // f) of them."""
    unet = tiny_unet()
    x, c = torch.randn(2, 4, 16, 12), torch.randn(2, 77, 32)
    state = Acceleration(token_method("todo", factor=factor, max_downsample=2)).start(1, 0)
    state.begin_call(0, x)

    def keep(st, grid, sub):
        pruned = sub == "kv1" and grid in ((16, 12), (8, 6))
        return (grid[0] // factor) * (grid[1] // factor) if pruned else grid[0] * grid[1]

    assert analytic(unet, (16, 12), keep=keep) == hooked_macs(unet, x, c, state)


def test_deepcache_sd15_number():
    """DeepCache reports 338.83 GMACs for the SD1.5 UNet at 512x512 (no attention matmuls)."""
    with torch.device("meta"):
        unet = UNetModel(SD1.unet)
    total = sum(unet_macs(unet, (64, 64)).values())
    assert abs(total / 338.83e9 - 1) < 0.01
    with_matmuls = sum(unet_macs(unet, (64, 64), matmuls=True).values())
    assert 400e9 < with_matmuls < 403e9
    assert abs(sum(unet_macs(unet, (64, 64), depth=1).values()) / total - 0.061) < 0.002   # DaTo's shallow call
