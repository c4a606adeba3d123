"""SiTo (Zhang et al., AAAI 2025): similarity-based token pruning.

Base token of each sy x sx cell = argmax of sim_beta * SimScore + noise_alpha * N(0, 1), where
SimScore_i = sum_j cos(x_i, x_j) is how representative token i is of the whole image. The
k = int(N * ratio) candidates most similar to some base token are pruned; after the sub-layer
each copies the result of its most similar kept or base token (recover_from).
SimScore is computed as x̂_i · (sum_j x̂_j): O(N C), never the N x N cosine matrix.
"""
from dataclasses import dataclass

from .method import RecoveringMethod
from .tokens import noise, normalized, per_cell_argmax, split_by_similarity


@dataclass(frozen=True)
class SiTo(RecoveringMethod):
    """SiTo's settings beside RecoveringMethod's: sim_beta, SimScore's weight (1.0)."""
    name = "sito"
    sim_beta: float = 1.0

    def plan(self, x, hw, ratio, generator=None, dynamics=None, guided=False):
        """x [B, h*w, C] (the block input) -> (prune, recover) as a TokenPlan.

        ratio: fraction of all tokens pruned (0.5-0.7), in [0, tokens.max_ratio(sx, sy)], checked
        with the settings. generator: the noise that varies the base tokens between calls.
        """
        h, w = hw
        m = normalized(x)
        mf = m.float()   # SimScore sums N cosines: low-precision rounding would tie whole cells
        score = self.sim_beta * (mf @ mf.sum(dim=1)[..., None]).squeeze(-1)   # [B, N]
        if self.noise_alpha:
            score = score + self.noise_alpha * noise(score.shape, generator).to(score.device)
        base = per_cell_argmax(score, h, w, self.sx, self.sy)
        return split_by_similarity(m, base, int(x.shape[1] * ratio), self.recover_from)
