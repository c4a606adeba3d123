"""ToDo against its definition, computed by hand: keys and values of self-attention from the tokens
that nearest-exact downsampling keeps (source index floor((i + 1/2) * h / h') per axis), every token
still querying; off where the schedule says, and nothing else of the UNet changed."""
import math

import pytest
import torch

from accel import Acceleration
from conftest import tiny_unet
from model.unet import CrossAttention, run_with_plan
from prune import token_method
from sampler import sample


def nearest_exact_rows(size, small):
    """The source row of each of `small` output rows (torch's nearest-exact, written out)."""
    return [min(math.floor((i + 0.5) * size / small), size - 1) for i in range(small)]


@pytest.mark.parametrize("hw,factor", [((8, 8), 2), ((16, 12), 2), ((12, 9), 3), ((16, 12), 3), ((7, 10), 2)])
def test_keys_values_are_the_nearest_tokens(hw, factor):
    (h, w), c = hw, 6
    x = torch.randn(2, h * w, c, dtype=torch.float64)
    kv = token_method("todo", factor=factor).plan(x, hw, 0.75).keys_values(x)
    rows, cols = nearest_exact_rows(h, h // factor), nearest_exact_rows(w, w // factor)
    expected = torch.stack([x[:, r * w + q] for r in rows for q in cols], dim=1)
    assert torch.equal(kv, expected)
    if h % factor == 0 and w % factor == 0:   # one token per cell: the one at offset factor // 2
        grid = x.view(2, h, w, c)[:, factor // 2::factor, factor // 2::factor]
        assert torch.equal(kv, grid.reshape(2, -1, c))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_self_attention_reads_keys_values_from_the_small_grid(backend):
    torch.manual_seed(0)
    attn = CrossAttention(16, 2, 8).double().eval()
    attn.backend = backend
    hw, x = (8, 6), torch.randn(2, 48, 16, dtype=torch.float64)
    plan = token_method("todo", factor=2).plan(x, hw, 0.75)
    small = x.view(2, 8, 6, 16)[:, 1::2, 1::2].reshape(2, 12, 16)
    heads = lambda t: t.unflatten(-1, (2, 8)).transpose(1, 2)   # noqa: E731
    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(small)), heads(attn.to_v(small))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)          # [B, heads, 48, 12]
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(2, 48, 16))
    with torch.no_grad():
        out = run_with_plan(attn, x, plan)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def run(accel, seed=0, steps=6):
    unet = tiny_unet()
    x = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(seed))
    c = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return sample(unet, x, c[:1], c[1:], steps=steps, accel=accel, seed=seed)


def test_settings_that_would_change_nothing_are_refused():
    """factor 1 keeps every key and value, stop 1 (or one that rounds every call away) keeps every call plain: a
    run labelled todo that is the plain run."""
    for settings, message in ((dict(factor=1), "factor must be a whole number >= 2"),
                              (dict(stop=1.0), "in \\[0, 1\\)")):
        with pytest.raises(ValueError, match=message):
            token_method("todo", **settings)
    with pytest.raises(ValueError, match="stop 0.9 leaves none of this run's 4 UNet calls downsampled"):
        Acceleration(token_method("todo", stop=0.9)).check(4)
    Acceleration(token_method("todo", stop=0.8)).check(4)   # one call of four


def test_todo_changes_the_run_a_little():
    a, b, plain = run(Acceleration(token_method("todo"))), run(Acceleration(token_method("todo"))), run(None)
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert (a - plain).abs().mean() < 0.5 * plain.abs().mean()


@pytest.mark.parametrize("stop,active", [(0.0, 7), (0.3, 5), (0.5, 4)])
def test_stop_turns_it_off_for_the_last_calls(stop, active):
    """PLMS-6 makes 7 UNet calls; ToDo acts on round(7 * (1 - stop)) of them, the first ones, on the
    five top-level blocks each (max_downsample 1)."""
    calls = []

    class Count(type(token_method("todo"))):
        def plan(self, x, hw, ratio, **kw):
            calls.append(hw)
            return super().plan(x, hw, ratio, **kw)

    settings = Count(stop=stop)
    run(Acceleration(settings))
    assert len(calls) == 5 * active and set(calls) == {(16, 12)}
    assert [settings.ratio_at(i, 7) > 0 for i in range(7)] == [i < active for i in range(7)]


def test_settings_are_checked():
    for bad, message in ((dict(factor=0), "factor must be a whole number"), (dict(factor=1.5), "whole number"),
                         (dict(mode="cubic"), "mode must be one of"), (dict(stop=1.5), r"in \[0, 1\)"),
                         (dict(layers=("attn1", "ff")), "layers must be"), (dict(ratio=0.5), "not a setting of todo")):
        with pytest.raises(ValueError, match=message):
            token_method("todo", **bad)
