"""Token pruning: plan properties, SiTo against a brute-force N x N reference, ToMe against
tomesd, DaTo's dynamics and CFG alignment, and exactness where results must be exact."""
import re

import pytest
import torch
from tomesd.merge import bipartite_soft_matching_random2d

from accel import PRESETS, Acceleration
from conftest import tiny_unet
from model.unet import BasicTransformerBlock, CrossAttention
from prune import DaTo, SiTo, ToMe, token_method
from prune.dato import random_cells
from prune.tokens import cell_indices, gather_rows
from sampler import sample, stream_seed

GRIDS = [(8, 8), (6, 10), (7, 5), (9, 9)]   # square, non-square, and sides not divisible by the cell


def plan_of(method, x, hw, ratio, **kw):
    g = torch.Generator().manual_seed(0)
    if method == "dato_random":
        return DaTo(base_tokens="local_random", **kw).plan(x, hw, ratio, generator=g)
    if method == "dato":
        dynamics = kw.pop("dynamics", torch.rand(x.shape[0], *hw, generator=g))
        return DaTo(**kw).plan(x, hw, ratio, generator=g, dynamics=dynamics)
    return {"tome": ToMe, "sito": SiTo}[method](**kw).plan(x, hw, ratio, generator=g)


@pytest.mark.parametrize("method", ["tome", "sito", "dato", "dato_random"])
@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_plan_properties(method, hw, ratio, batch):
    h, w = hw
    n = h * w
    x = torch.randn(batch, n, 16, dtype=torch.float64)
    plan = plan_of(method, x, hw, ratio)
    kept, pruned, base = plan.kept, plan.pruned, plan.base
    k = int(n * ratio)
    assert pruned.shape == (batch, k) and kept.shape == (batch, n - k)
    for b in range(batch):   # kept and pruned partition the grid
        assert sorted(kept[b].tolist() + pruned[b].tolist()) == list(range(n))
        cells = [(i // w // 2, i % w // 2) for i in base[b].tolist()]   # exactly one base per full cell
        assert sorted(cells) == [(r, c) for r in range(h // 2) for c in range(w // 2)]
        assert set(base[b].tolist()) <= set(kept[b].tolist())
    prune, recover = plan
    y = recover(prune(x))
    if method != "tome":   # dropped, then copied back: kept tokens are themselves, pruned ones their source
        assert torch.equal(gather_rows(y, kept), gather_rows(x, kept))
        assert torch.equal(gather_rows(y, pruned), gather_rows(x, kept.gather(1, plan.source)))
    else:                  # merged: each merged token holds the mean of its group, as its dst does
        assert torch.allclose(y.gather(1, pruned[..., None].expand(-1, -1, 16)),
                              y.gather(1, kept.gather(1, plan.source)[..., None].expand(-1, -1, 16)))


def sito_reference(x, hw, k, recover_from):
    """The official SiTo algorithm with the full N x N cosine matrix, written plainly."""
    h, w = hw
    m = x / x.norm(dim=-1, keepdim=True)
    gram = m @ m.T
    score = gram.sum(-1)
    base = []
    for r in range(h // 2):
        for c in range(w // 2):
            cell = [(2 * r + dy) * w + 2 * c + dx for dy in range(2) for dx in range(2)]
            base.append(max(cell, key=lambda i: score[i].item()))
    cand = [i for i in range(h * w) if i not in base]
    best = gram[cand][:, base].max(-1).values
    order = best.argsort(descending=True).tolist()
    pruned, unpruned = [cand[i] for i in order[:k]], [cand[i] for i in order[k:]]
    targets = base if recover_from == "base" else unpruned + base
    source = [targets[gram[p, targets].argmax().item()] for p in pruned]
    return sorted(base), sorted(pruned), dict(zip(pruned, source, strict=True))


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("recover_from", ["kept", "base"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_sito_matches_full_gram_reference(hw, recover_from, ratio):
    x = torch.randn(2, hw[0] * hw[1], 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plan = SiTo(noise_alpha=0.0, recover_from=recover_from).plan(x, hw, ratio)
    k = int(x.shape[1] * ratio)
    for b in range(2):
        base, pruned, source = sito_reference(x[b], hw, k, recover_from)
        assert sorted(plan.base[b].tolist()) == base and sorted(plan.pruned[b].tolist()) == pruned
        ours = dict(zip(plan.pruned[b].tolist(), plan.kept[b][plan.source[b]].tolist(), strict=True))
        assert ours == source


@pytest.mark.parametrize("hw", [(8, 8), (6, 10), (7, 9)])
@pytest.mark.parametrize("use_rand", [False, True])
def test_tome_matches_tomesd(hw, use_rand):
    """Same dst choice (the same generator draws) -> the same merged groups and results. The order
    of tokens inside the merged tensor is tomesd's unstable argsort's business, so compare what a
    block computes: recover(f(prune(x))) for token-wise f and for self-attention."""
    h, w = hw
    torch.manual_seed(0)
    attn = CrossAttention(32, heads=2, head_dim=16).eval()
    x = torch.randn(2, h * w, 32, generator=torch.Generator().manual_seed(2))
    r = int(h * w * 0.5)
    merge, unmerge = bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=not use_rand,
                                                      generator=torch.Generator().manual_seed(5))
    prune, recover = ToMe(use_rand=use_rand).plan(x, hw, 0.5, generator=torch.Generator().manual_seed(5))
    assert prune(x).shape == merge(x).shape == (2, h * w - r, 32)
    with torch.no_grad():
        for f in (lambda t: t, torch.tanh, attn):
            torch.testing.assert_close(recover(f(prune(x))), unmerge(f(merge(x))), rtol=1e-5, atol=1e-6)


def test_dato_bases_follow_dynamics_and_align_cfg():
    h, w = 6, 8
    dynamics = torch.rand(4, h, w, generator=torch.Generator().manual_seed(3))
    x = torch.randn(4, h * w, 16)
    plan = DaTo(noise_alpha=0.0).plan(x, (h, w), 0.5, dynamics=dynamics)
    for b in range(4):
        d = dynamics[b]
        expected = sorted(max(((2 * r + dy) * w + 2 * c + dx for dy in range(2) for dx in range(2)),
                              key=lambda i: d.flatten()[i].item())
                          for r in range(h // 2) for c in range(w // 2))
        assert sorted(plan.base[b].tolist()) == expected
    aligned = DaTo(noise_alpha=0.0).plan(x, (h, w), 0.5, dynamics=dynamics, guided=True)
    assert torch.equal(DaTo(noise_alpha=0.0, align_cfg=False).plan(x, (h, w), 0.5, dynamics=dynamics,
                                                                  guided=True).base, plan.base)
    assert torch.equal(aligned.base[2:], aligned.base[:2]) and torch.equal(aligned.base[:2], plan.base[:2])
    with pytest.raises(ValueError, match="guided batch"):
        DaTo().plan(x[:3], (h, w), 0.5, dynamics=dynamics[:3], guided=True)


@pytest.mark.parametrize("guided", [True, False])
def test_dato_aligns_only_guided_batches(guided):
    """An unguided batch of two images is two independent rows, not [uncond; cond]."""
    h, w = 8, 8
    state = Acceleration(token_method("dato", noise_alpha=0.0)).start(calls=3, seed=0, guided=guided)
    for _ in range(2):
        state.end_call(torch.randn(2, 4, h, w))
    state.begin_call(2, torch.zeros(2, 4, h, w))
    plan, _, _ = state.token_plans(torch.randn(2, h * w, 16), (h, w), "block", 0)
    assert torch.equal(plan.base[0], plan.base[1]) == guided


def test_dato_without_dynamics_uses_noise():
    x = torch.randn(2, 64, 16)
    a, b = (DaTo().plan(x, (8, 8), 0.5, dynamics=None, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    assert not torch.equal(a.base, b.base)


def dato_local_random_reference(x, hw, num_prune, rand_idx, sx=2, sy=2):
    """The official DaTo plan with local_random=True (datosd/dato.py prune_and_recover_tokens), written
    plainly for one row x [N, C]: rand_idx [h//sy, w//sx, 1] is its randint draw. Its argsorts are
    made stable here; the official ones are not, which only reorders tokens within a set."""
    h, w = hw
    hc, wc = h // sy, w // sx
    m = x / x.norm(dim=-1, keepdim=True)
    gram = m @ m.T                                                   # the N x N cosine graph
    buffer = torch.zeros(hc, wc, sy * sx, dtype=torch.long).scatter_(-1, rand_idx, -1)
    buffer = buffer.view(hc, wc, sy, sx).transpose(1, 2).reshape(hc * sy, wc * sx)
    padded = torch.zeros(h, w, dtype=torch.long)                     # remainder rows/columns: candidates
    padded[:hc * sy, :wc * sx] = buffer
    order = padded.flatten().argsort(stable=True)
    b_idx, a_idx = order[:hc * wc], order[hc * wc:]                  # base (dst), candidates (src)
    edge = (-gram[a_idx][:, b_idx].max(-1).values).argsort(stable=True)
    pruned, unpruned = a_idx[edge[:num_prune]], a_idx[edge[num_prune:]]
    combined = torch.cat([unpruned, b_idx])                          # kept, in the pruned tensor's order
    source = combined[gram[combined][:, pruned].argmax(0)]           # most similar kept token
    return b_idx, pruned, combined, source


@pytest.mark.parametrize("hw,sx,sy", [((8, 8), 2, 2), ((6, 10), 2, 2), ((7, 5), 2, 2), ((9, 9), 2, 2),
                                      ((7, 8), 3, 2), ((10, 7), 2, 3)])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.6])
def test_dato_local_random_matches_official(hw, sx, sy, ratio):
    """Given the same randint draw, our local_random plan is the official one: the same base, pruned
    and kept tokens and the same source for each pruned token, for every row of the batch."""
    h, w = hw
    x = torch.randn(3, h * w, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ratio = min(ratio, 1 - 1 / (sx * sy))
    k = int(h * w * ratio)
    rand_idx = torch.randint(sy * sx, (h // sy, w // sx, 1), generator=torch.Generator().manual_seed(7))
    plan = DaTo(base_tokens="local_random", sx=sx, sy=sy, ratio=ratio).plan(
        x, hw, ratio, generator=torch.Generator().manual_seed(7), dynamics=torch.rand(3, h, w))
    for b in range(3):
        base, pruned, kept, source = dato_local_random_reference(x[b], hw, k, rand_idx, sx, sy)
        assert sorted(plan.base[b].tolist()) == sorted(base.tolist())
        assert plan.pruned[b].tolist() == pruned.tolist()          # same tokens, removed in the same order
        assert sorted(plan.kept[b].tolist()) == sorted(kept.tolist())
        assert plan.kept[b][plan.source[b]].tolist() == source.tolist()


@pytest.mark.parametrize("guided", [True, False])
def test_dato_local_random_one_pattern_per_call(guided):
    """In a sampling run every pruned block of a UNet call and every batch row (guided or not) gets
    the same base tokens, drawn from the call's own stream; each call gets a new pattern."""
    bases = []

    class Record(DaTo):
        def plan(self, x, hw, ratio, **kw):
            plan = super().plan(x, hw, ratio, **kw)
            bases.append(plan.base)
            return plan

    unet, hw = tiny_unet(), (16, 12)
    x = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(0))
    c = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(0))
    accel = Acceleration(Record(ratio=0.5, base_tokens="local_random"))
    with torch.no_grad():
        sample(unet, x, c[:2], c[2:] if guided else None, steps=6, accel=accel, seed=5)
    assert len(bases) == 5 * 7   # five 64x64-type blocks, 6 PLMS steps = 7 calls
    calls = [bases[i:i + 5] for i in range(0, len(bases), 5)]
    for i, blocks in enumerate(calls):
        first = blocks[0]
        assert first.shape[0] == (4 if guided else 2)
        assert all(torch.equal(base, first) for base in blocks)
        assert all(torch.equal(row, first[0]) for row in first)
        g = torch.Generator().manual_seed(stream_seed(5, f"accel/call{i}"))
        assert torch.equal(first[0], cell_indices(random_cells(hw, 2, 2, g), hw[1], 2, 2))
    assert len({tuple(blocks[0][0].tolist()) for blocks in calls}) == len(calls)


def test_base_tokens_setting_is_checked():
    for method in ("tome", "sito", "todo"):
        with pytest.raises(ValueError, match=f"base_tokens is not a setting of {method} but of dato"):
            token_method(method, base_tokens="local_random")
    with pytest.raises(ValueError, match=r"base_tokens must be one of \('dynamics', 'local_random'\)"):
        token_method("dato", base_tokens="random")
    with pytest.raises(ValueError, match="base_tokens must be one of"):
        DaTo(base_tokens="simscore")
    x, outputs = torch.zeros(2, 4, 8, 8), (torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8))
    for base, uses in (("local_random", False), ("dynamics", True)):
        run = token_method("dato", base_tokens=base).start(lambda name: 0)
        run.begin_call(0, x, outputs)
        assert (run.dynamics is not None) == uses


def test_dato_presets_follow_the_official_recipes():
    """dato-fixed: the search driver's settings (diff_gema 0.1, dynamics); dato-coco: run_command9
    (diff_gema 1, dynamics, align_cfg); dato-coco-random: run_command8 (local_random), same vector."""
    fixed, coco, rand = (PRESETS[name] for name in ("dato-fixed", "dato-coco", "dato-coco-random"))
    assert fixed.prune == token_method("dato", ratio=0.4, gamma=0.1, noise_alpha=0.1, base_tokens="dynamics")
    assert coco.prune == token_method("dato", ratio=0.4, gamma=1.0, noise_alpha=0.1, align_cfg=True)
    assert rand.prune == token_method("dato", ratio=0.4, base_tokens="local_random")
    assert rand.cache == coco.cache and rand.made_for == coco.made_for == ("plms", 50)
    assert "run_command9" in coco.about and "run_command8" in rand.about


@pytest.mark.parametrize("method", ["tome", "sito", "dato"])
@pytest.mark.parametrize("recover_from", ["kept", "base"])
def test_pruning_feed_forward_of_duplicates_changes_nothing(method, recover_from):
    """Tokens identical within each 2x2 cell: every pruned token is an exact duplicate of its
    source, so pruning (or merging) only the feed-forward must reproduce the block output."""
    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 2, 16, context_dim=24).eval()
    cells = torch.randn(2, 4, 4, 32, dtype=torch.float64)
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 64, 32)
    block.double()
    context = torch.randn(2, 5, 24, dtype=torch.float64)

    class FeedForwardOnly:
        def token_plans(self, x, hw, name, downsamples):
            kw = {} if method == "tome" else {"recover_from": recover_from}
            return None, None, plan_of(method, x, hw, 0.75, **kw)

        def cross_attention(self, block):   # the rest of model.unet.RunState: cross-attention computed
            return None

        def remember_cross(self, block, out):
            pass

    with torch.no_grad():
        torch.testing.assert_close(block(x, context, (8, 8), FeedForwardOnly()), block(x, context, (8, 8)),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, settings, message", [
    ("sito", {"ratio": "0.5"}, "ratio must be a number, got '0.5'"), ("tome", {"sx": "2"}, "sx must be a whole number"),
    ("tome", {"sx": 2.0}, "sx must be a whole number"),
    ("dato", {"align_cfg": "no"}, "align_cfg must be True or False"),
    ("todo", {"stop": "0.3"}, "stop must be a number"), ("sito", {"layers": "attn1"}, "layers must be a tuple"),
    ("dato", {"schedule": ("0.5",) * 3}, "prune ratio must be a number"),
    ("tome", {"max_downsample": True}, "max_downsample must be a whole number"),
    ("dato", {"noise_alpha": -5}, "noise_alpha must be >= 0"),
    ("dato", {"gamma": -1.0}, "DaTo's gamma (the dynamics' weight) must be >= 0")])
def test_settings_of_the_wrong_type_are_one_clear_error(name, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        token_method(name, **settings)
    assert token_method("sito", layers=["attn1", "ff"]).layers == ("attn1", "ff")   # a JSON array means the tuple


def test_ratio_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 0.75\]"):
        token_method("sito", ratio=0.8)
    with pytest.raises(ValueError, match=r"\[0, 0.888"):
        SiTo(ratio=0.9, sx=3, sy=3)
    with pytest.raises(ValueError, match="unknown token method"):
        token_method("fastv")
    with pytest.raises(ValueError, match="subset"):
        token_method("sito", layers=("attn3",))


def run_unet(accel, seed=0):
    unet = tiny_unet()
    x = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(seed))
    c = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return sample(unet, x[:1], c[:1], c[1:], steps=6, accel=accel, seed=seed)


def test_ratio_0_is_bit_identical():
    plain = run_unet(None)
    for accel in (Acceleration(), Acceleration(token_method("sito", ratio=0.0)),
                  Acceleration(token_method("dato", ratio=0.0, layers=("attn1", "attn2", "ff")))):
        assert torch.equal(run_unet(accel), plain)


@pytest.mark.parametrize("method", ["tome", "sito", "dato"])
def test_pruned_sampling_runs_and_is_seeded(method):
    accel = Acceleration(token_method(method, ratio=0.5, max_downsample=2, layers=("attn1", "attn2")))
    a, b, plain = run_unet(accel), run_unet(accel), run_unet(None)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(a, plain) and (a - plain).abs().mean() < plain.abs().mean()


def test_blocks_pruned_by_max_downsample():
    seen = {}

    class Count(SiTo):
        def plan(self, x, hw, ratio, **kw):
            seen[hw] = seen.get(hw, 0) + 1
            return super().plan(x, hw, ratio, **kw)

    for maxdown, grids in ((1, {(16, 12)}), (2, {(16, 12), (8, 6)}), (8, {(16, 12), (8, 6), (4, 3), (2, 2)})):
        seen.clear()
        run_unet(Acceleration(Count(ratio=0.5, max_downsample=maxdown)))
        assert set(seen) == grids
    assert seen[(16, 12)] == 5 * 7   # five 64x64-type blocks, 6 PLMS steps = 7 calls


def test_schedule_length_is_checked():
    with pytest.raises(ValueError, match="7 UNet calls"):
        run_unet(Acceleration(token_method("dato", schedule=(0.5,) * 6)))
