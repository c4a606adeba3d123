"""ToMe for Stable Diffusion (Bolya & Hoffman, 2023): merge tokens into random per-cell dst tokens.

One dst token per sy x sx cell, chosen at random (or the top-left one); the k = int(N * ratio)
src tokens most similar (cosine) to some dst are averaged into it (mean, the dst included), and
after the sub-layer each merged token copies its dst's result. Same partition for every row of
the batch, so the CFG halves share it. The same as tomesd's (docs/methods.md).
"""
from dataclasses import dataclass

import torch

from .method import CellMethod
from .tokens import TokenPlan, cell_indices, normalized, split_by_similarity


@dataclass(frozen=True)
class ToMe(CellMethod):
    """ToMe's settings beside CellMethod's: use_rand, random dst per cell (True) or the top-left."""
    name = "tome"
    use_rand: bool = True

    def plan(self, x, hw, ratio, generator=None, dynamics=None, guided=False):
        """x [B, h*w, C] (the block input) -> (merge, unmerge) as a TokenPlan.

        ratio: fraction of all tokens merged away (0.5; in [0, tokens.max_ratio(sx, sy)], as the
        settings' ratios are). generator: the random dst per cell (use_rand).
        """
        (h, w), (b, n, _) = hw, x.shape
        hc, wc = h // self.sy, w // self.sx
        if self.use_rand:   # drawn on the generator's device, the same number of draws as tomesd
            choice = torch.randint(self.sy * self.sx, (hc, wc), generator=generator,
                                   device=generator.device if generator is not None else "cpu")
        else:
            choice = torch.zeros(hc, wc, dtype=torch.long)
        dst = cell_indices(choice.to(x.device), w, self.sx, self.sy).expand(b, -1)
        split = split_by_similarity(normalized(x), dst, int(n * ratio), recover_from="base")
        return TokenPlan(split.kept, split.pruned, split.source, split.base, merge=True)
