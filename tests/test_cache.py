"""Feature caching: cached calls reproduce full ones from the same input, schedules, presets,
per-run reset, and DaTo (caching + pruning) end to end on the TINY UNet."""
from dataclasses import replace

import pytest
import torch

from accel import PRESETS, Acceleration
from cache import FULL, CacheSchedule, deepcache_nonuniform
from conftest import tiny_unet
from model import TINY
from model.macs import unet_macs
from model.unet import UNetModel, timestep_embedding
from prune import DaTo, token_method
from sampler import sample


def inputs(seed=0, hw=(16, 12)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, *hw, generator=g), torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)


def run(unet, accel, seed=0, steps=6, hw=(16, 12)):
    x, cond, uncond = inputs(seed, hw)
    return sample(unet, x, cond, uncond, steps=steps, accel=accel, seed=seed)


def test_interval_1_is_bit_identical():
    unet = tiny_unet()
    assert torch.equal(run(unet, Acceleration(cache=CacheSchedule("uniform", interval=1))), run(unet, None))


@pytest.mark.parametrize("hw", [(16, 12), (9, 13)])
@pytest.mark.parametrize("depth", range(FULL))
def test_cached_call_on_the_same_input_reproduces_the_full_call(depth, hw):
    """The cache holds the right tensors at the right joins: with unchanged inputs, recomputing
    the outer d blocks on top of the remembered features gives the full output exactly."""
    unet = tiny_unet()
    x, context = torch.randn(2, 4, *hw), torch.randn(2, 77, 32)
    state = Acceleration(cache=CacheSchedule("dato", depths=(FULL, depth))).start(calls=2, seed=0)
    outs = []
    for i in range(2):
        state.begin_call(i, x)
        outs.append(unet(x, 500, context, state=state))
    assert torch.equal(outs[1], outs[0])


def test_cache_depths_follow_the_unets_own_block_count():
    """The UNet owns what a depth means: on three levels (9 output blocks, SDXL's count) every
    cached depth 0..8 rebuilds the full call from the same input, FULL still means a full call,
    and a depth the UNet does not have is refused by the UNet, naming its block count."""
    config = replace(TINY.unet, channel_mult=(1, 2, 2), attention_levels=(1, 2))
    unet = UNetModel(config).eval().requires_grad_(False)
    assert len(unet.output_blocks) == 9
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    for depth in range(9):
        state = Acceleration(cache=CacheSchedule("dato", depths=(FULL, depth))).start(calls=2, seed=0)
        outs = []
        for i in range(2):
            state.begin_call(i, x)
            outs.append(unet(x, 500, context, state=state))
        assert torch.equal(outs[1], outs[0]) and torch.equal(outs[0], unet(x, 500, context))
        assert sum(unet_macs(unet, (8, 8), depth=depth).values()) < sum(unet_macs(unet, (8, 8)).values())
    state = Acceleration(cache=CacheSchedule("dato", depths=(FULL, 9))).start(calls=2, seed=0)
    state.begin_call(0, x)
    unet(x, 500, context, state=state)
    state.begin_call(1, x)
    with pytest.raises(ValueError, match="9 output blocks"):
        unet(x, 500, context, state=state)


def test_cached_call_differs_when_input_changes():
    unet = tiny_unet()
    context = torch.randn(2, 77, 32)
    state = Acceleration(cache=CacheSchedule("dato", depths=(FULL, 1))).start(calls=2, seed=0)
    state.begin_call(0, torch.zeros(2, 4, 8, 8))
    unet(torch.zeros(2, 4, 8, 8), 500, context, state=state)
    x = torch.randn(2, 4, 8, 8)
    state.begin_call(1, x)
    cached = unet(x, 500, context, state=state)
    full = unet(x, 500, context)
    # a depth-1 call recomputes conv_in and output_blocks.11 on the new input: its output moves,
    # but not to the full call's (the deeper features are the zero input's)
    assert cached.shape == full.shape and not torch.allclose(cached, full, atol=1e-4)
    state.begin_call(1, torch.zeros(2, 4, 8, 8))
    assert not torch.allclose(cached, unet(torch.zeros(2, 4, 8, 8), 500, context, state=state), atol=1e-4)


def test_cached_calls_refresh_the_blocks_they_recompute():
    """Depths FULL, 2, 1, 0 on changing inputs: each shallower call starts from the result the
    previous cached call computed (not the full call's), so depth 0 returns call 2's output and
    call 2 equals a depth-1 recomputation on top of call 1's output_blocks.10 result."""
    unet = tiny_unet()
    context = torch.randn(2, 77, 32)
    xs = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    state = Acceleration(cache=CacheSchedule("dato", depths=(FULL, 2, 1, 0))).start(calls=4, seed=0)
    outs, features = [], []
    for i, x in enumerate(xs):
        state.begin_call(i, x)
        outs.append(unet(x, 500, context, state=state))
        features.append(list(state.features))
    assert all(a is b for a, b in zip(features[1][:10], features[0][:10], strict=True))   # deeper blocks untouched
    assert not torch.equal(features[1][10], features[0][10]) and not torch.equal(features[1][11], features[0][11])
    assert features[2][10] is features[1][10] and not torch.equal(features[2][11], features[1][11])
    assert torch.equal(outs[3], outs[2])
    emb = unet.time_embed(timestep_embedding(torch.full((2,), 500), TINY.unet.model_channels))
    skip = unet.input_blocks[0](xs[2].contiguous(memory_format=torch.channels_last), emb, context)
    by_hand = unet.out(unet.output_blocks[11](torch.cat([features[1][10], skip], 1), emb, context))
    assert torch.equal(outs[2], by_hand)
    assert not torch.equal(unet(x, 500, context, state=state), unet(x, 500, context))


def test_schedules():
    assert deepcache_nonuniform(50, 10, 15, 1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]   # DeepCache's demo setting
    full = lambda s, calls=51: [i for i, d in enumerate(s.depths_for(calls)) if d == FULL]  # noqa: E731
    assert full(CacheSchedule("uniform", interval=5)) == list(range(0, 51, 5))
    assert full(CacheSchedule("uniform", interval=3), 50) == list(range(0, 50, 3))
    assert full(CacheSchedule("uniform", interval=1)) == list(range(51))
    assert full(CacheSchedule("nonuniform", interval=5), 50) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert full(CacheSchedule("nonuniform", interval=5)) == [0, 5, 8, 12, 15, 19, 24, 28, 33, 39, 45]
    depths = CacheSchedule("uniform", interval=4, depth=3).depths_for(10)
    assert depths == [FULL, 3, 3, 3, FULL, 3, 3, 3, FULL, 3]
    explicit = (FULL, 0, 1, 2, FULL, 5)
    assert CacheSchedule("dato", depths=explicit).depths_for(6) == list(explicit)


def test_presets():
    expect = {"deepcache-n3": (17, 0, 0), "deepcache-n5": (11, 0, 0), "deepcache-n5-nonuniform": (11, 0, 0),
              "dato-fixed": (6, 38, 7), "dato-coco": (5, 21, 25)}
    for name, (n_full, n_shallow, n_reuse) in expect.items():
        depths = PRESETS[name].cache.depths_for(51)
        assert len(depths) == 51 and depths[0] == FULL
        assert (depths.count(FULL), depths.count(1), depths.count(0)) == (n_full, n_shallow, n_reuse), name
    fixed = PRESETS["dato-fixed"].cache.depths_for(51)
    assert [i for i, d in enumerate(fixed) if d == FULL] == [0, 7, 17, 22, 30, 41]
    assert PRESETS["dato-coco"].prune == token_method("dato", ratio=0.4)


@pytest.mark.parametrize("kw,match", [
    (dict(mode="every"), "unknown cache mode"), (dict(interval=0), "interval"), (dict(depth=12), "depth"),
    (dict(mode="dato"), "explicit"), (dict(mode="dato", depths=(FULL, 13)), r"0\.\.12"),
    (dict(mode="nonuniform", power=1.0), "power"), (dict(mode="nonuniform", power=1e6), "power must be in \\(1, 10\\]"),
    (dict(interval=2.5), "interval must be a whole number"), (dict(mode="dato", depths=(12, True)), "depths must be"),
    (dict(mode="nonuniform", center=-1), "^center \\(of the non-uniform schedule\\) must be a UNet call index"),
    (dict(mode="uniform", depths=(FULL, 1)), "own depths"), (dict(power="x"), "power must be a number"),
    (dict(depths=None), "one depth per UNet call")])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        CacheSchedule(**kw)


def test_bad_schedule_for_the_run():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="this run makes 7 UNet calls"):
        run(unet, Acceleration(cache=CacheSchedule("dato", depths=(FULL, 1, 1))))
    with pytest.raises(ValueError, match="first call"):
        run(unet, Acceleration(cache=CacheSchedule("dato", depths=(1,) * 7)))
    with pytest.raises(ValueError, match="cannot place"):
        run(unet, Acceleration(cache=CacheSchedule("nonuniform", interval=1, center=3)))
    with pytest.raises(ValueError, match="^center 7 \\(of the non-uniform schedule\\) is not a UNet call "
                                         "of this run \\(0 .. 6\\)"):
        run(unet, Acceleration(cache=CacheSchedule("nonuniform", center=7)))
    with pytest.raises(ValueError, match="51 entries, but this run makes 7"):
        run(unet, Acceleration(cache=PRESETS["dato-fixed"].cache))


def test_state_is_reset_between_runs():
    """A second run with the same settings does not see the first run's cache, outputs or RNG."""
    unet = tiny_unet()
    accel = Acceleration(token_method("dato", ratio=0.5), CacheSchedule("uniform", interval=3, depth=1))
    run(unet, accel, seed=1, hw=(8, 8))
    after_other = run(unet, accel, seed=2)
    assert torch.equal(after_other, run(tiny_unet(), accel, seed=2))


class Counting:
    """Counts, per UNet call, which top-level blocks run (a test-side forward hook)."""

    def __init__(self, unet):
        self.calls, self.current = [], None
        unet.register_forward_pre_hook(lambda m, a: self.calls.append(set()))
        for name in ("input_blocks", "output_blocks"):
            for i, block in enumerate(getattr(unet, name)):
                block.register_forward_pre_hook(lambda m, a, key=f"{name}.{i}": self.calls[-1].add(key))
        unet.middle_block.register_forward_pre_hook(lambda m, a: self.calls[-1].add("middle_block"))


def test_dato_end_to_end_runs_the_scheduled_blocks():
    steps = 8
    depths = (FULL, 1, 0, 1, FULL, 0, 2, 1, 3)
    schedule = (0.5, 0.3, 0.5, 0.4, 0.6, 0.5, 0.5, 0.7, 0.5)
    accel = Acceleration(token_method("dato", schedule=schedule), CacheSchedule("dato", depths=depths))
    unet = tiny_unet()
    counter = Counting(unet)
    plans = []

    class Watch(DaTo):
        def plan(self, x, hw, ratio, generator=None, dynamics=None, guided=False):
            assert guided   # run() samples with guidance: [uncond; cond] batches
            plans.append((len(counter.calls) - 1, ratio, dynamics is not None))
            return super().plan(x, hw, ratio, generator, dynamics, guided)

    accel_watched = Acceleration(Watch(schedule=schedule), accel.cache)
    out = run(unet, accel_watched, steps=steps)
    assert torch.isfinite(out).all() and torch.equal(out, run(tiny_unet(), accel, steps=steps))
    assert len(counter.calls) == steps + 1
    for blocks, d in zip(counter.calls, depths, strict=True):
        expected = {f"input_blocks.{i}" for i in range(d)} | {f"output_blocks.{i}" for i in range(12 - d, 12)}
        assert blocks == expected | ({"middle_block"} if d == FULL else set())
    # pruned 64x64-type blocks run only where recomputed: input_blocks.1/2 (depth > 1 / 2) and
    # output_blocks.9/10/11 (depth >= 3 / 2 / 1), with the call's ratio, dynamics from call 2 on
    per_call = [sum(k < d for k in (1, 2)) + sum(k >= 12 - d for k in (9, 10, 11)) for d in depths]
    assert [sum(c == i for c, _, _ in plans) for i in range(steps + 1)] == per_call
    assert all(r == schedule[c] for c, r, _ in plans)
    assert all(has == (c >= 2) for c, _, has in plans)


def test_cached_run_is_close_to_full_run():
    """DeepCache's premise on a smooth trajectory: caching changes the result a little."""
    unet = tiny_unet()
    full, cached = run(unet, None, steps=10), run(unet, Acceleration(cache=CacheSchedule("uniform", 2, 1)), steps=10)
    assert not torch.equal(full, cached) and (full - cached).abs().mean() < 0.5 * full.abs().mean()
