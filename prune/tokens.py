"""Token selection shared by ToMe, SiTo and DaTo.

All three split the h x w token grid the same way: one base token per sy x sx cell (ToMe calls
it dst), chosen by a per-method score; every other token (remainder rows/columns included) is a
candidate. The k candidates most similar to some base token are removed before the sub-layer
and get a copy of a kept token's result after it. What differs is only the score that picks the
base tokens, whether removed tokens are dropped (SiTo, DaTo) or averaged into their base (ToMe),
and which kept token they copy from.

Shapes: x [B, N, C] tokens in row-major grid order, N = h * w.
"""
import numbers

import torch
import torch.nn.functional as F

RECOVER = ("kept", "base")   # a pruned token copies its most similar kept token, or base token


def max_ratio(sx=2, sy=2):
    """The largest prune ratio with sx x sy cells: every token but one base token per cell can go,
    1 - 1/(sx*sy) (0.75 for 2x2). The one place this bound is stated."""
    return 1 - 1 / (sx * sy)


def check_ratio(ratio, sx, sy):
    """The ratio is the fraction of all tokens removed, in [0, max_ratio(sx, sy)]."""
    limit = max_ratio(sx, sy)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"prune ratio must be a number, got {ratio!r}")
    if not 0 <= ratio <= limit:
        raise ValueError(f"prune ratio {ratio} out of range: with {sx}x{sy} cells "
                         f"(one base token each) it must be in [0, {limit:g}]")


def cell_indices(choice, w, sx, sy):
    """choice [..., hc, wc]: position (0 .. sx*sy-1, row-major) inside each cell -> the chosen
    tokens' indices [..., hc*wc], in ascending order."""
    hc, wc = choice.shape[-2:]
    rows = torch.arange(hc, device=choice.device)[:, None] * sy + choice // sx
    cols = torch.arange(wc, device=choice.device)[None, :] * sx + choice % sx
    return (rows * w + cols).flatten(-2)


def per_cell_argmax(score, h, w, sx, sy):
    """score [B, N] -> index of the best-scoring token of every full cell [B, hc*wc]."""
    b, hc, wc = score.shape[0], h // sy, w // sx
    cells = score.view(b, h, w)[:, :hc * sy, :wc * sx].reshape(b, hc, sy, wc, sx)
    choice = cells.permute(0, 1, 3, 2, 4).reshape(b, hc, wc, sy * sx).argmax(-1)   # [B, hc, wc]
    return cell_indices(choice, w, sx, sy)


def gather_rows(x, idx):
    """x [B, N, C], idx [B, M] -> x[b, idx[b]] : [B, M, C]."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def complement(idx, n):
    """idx [B, M] distinct token indices -> the other n - M indices [B, n - M], ascending."""
    taken = torch.zeros(idx.shape[0], n, dtype=torch.uint8, device=idx.device).scatter_(1, idx, 1)
    # a stable sort puts the untaken indices first, in order (no boolean mask: no device sync)
    return taken.argsort(dim=1, stable=True)[:, :n - idx.shape[1]]


def normalized(x):
    return F.normalize(x, dim=-1)


def noise(shape, generator):
    """Standard normal noise of `shape` drawn on the generator's device (CPU without one)."""
    return torch.randn(shape, generator=generator,
                       device=generator.device if generator is not None else "cpu")


class TokenPlan:
    """The outcome of a selection: unpack as `prune, recover = plan`.

    kept [B, N-k]: tokens that go through the sub-layer, in the order of the pruned tensor
        (kept candidates first, then the base tokens);
    pruned [B, k]: tokens removed; source [B, k]: position in `kept` whose result each copies;
    base [B, nb]: the base tokens; merge: average each removed token into its source (ToMe)
        instead of dropping it.
    """

    def __init__(self, kept, pruned, source, base, merge=False):
        self.kept, self.pruned, self.source, self.base, self.merge = (
            kept, pruned, source, base, merge)

    def prune(self, x):
        """[B, N, C] -> [B, N-k, C]"""
        out = gather_rows(x, self.kept)
        if self.merge:
            index = self.source[..., None].expand(-1, -1, x.shape[-1])
            out = out.scatter_reduce(1, index, gather_rows(x, self.pruned), reduce="mean")
        return out

    def recover(self, y):
        """[B, N-k, C'] -> [B, N, C']: kept tokens get their result, pruned ones their source's."""
        c, n = y.shape[-1], self.kept.shape[1] + self.pruned.shape[1]
        out = y.new_empty(y.shape[0], n, c)
        out.scatter_(1, self.kept[..., None].expand(-1, -1, c), y)
        out.scatter_(1, self.pruned[..., None].expand(-1, -1, c), gather_rows(y, self.source))
        return out

    def __iter__(self):
        return iter((self.prune, self.recover))

    def roles(self):
        """[B, N] int8 map for visualisation: 0 kept, 1 base, 2 pruned."""
        n = self.kept.shape[1] + self.pruned.shape[1]
        roles = torch.zeros(self.kept.shape[0], n, dtype=torch.int8, device=self.kept.device)
        roles.scatter_(1, self.base, 1)
        return roles.scatter_(1, self.pruned, 2)


def split_by_similarity(m, base, k, recover_from="kept"):
    """Remove the k candidates most similar to any base token -> TokenPlan.

    m [B, N, C]: L2-normalised metric, similarities in its dtype (docs/methods.md); base [B, nb]:
    base token indices. recover_from: each removed token copies its most similar "base" token
    (free: the argmax already found) or "kept" token, base or not (a removed x kept-candidates
    product more). Cost: candidates x bases similarities, never the N x N matrix.
    """
    n = m.shape[1]
    cand = complement(base, n)                                          # [B, Nc]
    mb = gather_rows(m, base)
    best, best_base = (gather_rows(m, cand) @ mb.transpose(1, 2)).max(-1)   # [B, Nc] each
    order = best.argsort(dim=-1, descending=True)
    gone, stay = order[:, :k], order[:, k:]                             # positions within cand
    pruned, kept_cand = cand.gather(1, gone), cand.gather(1, stay)
    source = kept_cand.shape[1] + best_base.gather(1, gone)             # that base's slot in `kept`
    if recover_from == "kept" and kept_cand.shape[1]:
        sim, nearest = (gather_rows(m, pruned) @ gather_rows(m, kept_cand).transpose(1, 2)).max(-1)
        # ties go to the candidate, as an argmax over [kept candidates, bases] would do
        source = torch.where(sim >= best.gather(1, gone), nearest, source)
    return TokenPlan(torch.cat([kept_cand, base], dim=1), pruned, source, base)
