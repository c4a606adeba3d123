"""DaTo (Zhang et al., 2025): dynamics-aware token pruning.

Like SiTo, but the base token of each cell is the one whose noise prediction changed most
between the two previous UNet calls: score = gamma * D + noise_alpha * N(0, 1), with D the
channel-mean |eps_k - eps_(k-1)| of the raw UNet outputs, pooled to the block's grid. Base tokens
carry the dynamics through self-attention, which keeps cached steps (cache/) from going stale.
In a guided run (batch = [uncond; cond]) align_cfg uses the unconditional half's base tokens
for the conditional half too. base_tokens="local_random" instead draws a random position per
cell, one pattern for the whole batch and every block of a UNet call (DaToRun).

Departures from the official code, and why: docs/methods.md, "Differences from the official code".
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .method import RecoveringMethod, TokenRun, setting
from .tokens import cell_indices, noise, normalized, per_cell_argmax, split_by_similarity

BASE_TOKENS = ("dynamics", "local_random")


@dataclass(frozen=True)
class DaTo(RecoveringMethod):
    """DaTo's settings beside RecoveringMethod's; recommended values are the defaults.

    gamma: the dynamics' weight (1.0; the official code's `diff_gema`).
    base_tokens: "dynamics" (recommended; the paper's: argmax of gamma * D + noise_alpha * noise)
        or "local_random" (a random position per cell, one pattern for every block of a UNet call
        and every batch row, new each call; D, gamma, noise_alpha unused; the official code's
        default).
    align_cfg: guided runs: uncond and cond rows share base tokens (True).
    """
    name = "dato"
    gamma: float = 1.0
    align_cfg: bool = True
    base_tokens: str = setting("dynamics", "base", "DaTo base tokens: dynamics (the paper, "
                               "default) or local_random (the official code's default)",
                               choices=BASE_TOKENS)

    def start(self, stream):
        return DaToRun(self, stream)

    def plan(self, x, hw, ratio, generator=None, dynamics=None, guided=False):
        """x [B, h*w, C] (the block input) -> (prune, recover) as a TokenPlan.

        ratio: fraction of all tokens pruned (DaTo's searches span 0.3-0.7; in
            [0, tokens.max_ratio(sx, sy)], as the settings' ratios are).
        dynamics: D [B, h', w'] from dynamics_map, at the latent's grid or the block's (pooled to
            hw); None before two UNet outputs exist: base tokens then come from the noise.
        guided: x is a CFG batch [uncond; cond]; with align_cfg the halves share base tokens.
        generator: the noise of the base-token score, or local_random's draw (one for all rows).
        """
        b, n, _ = x.shape
        align = self.align_cfg and guided
        if align and b % 2:
            raise ValueError(f"align_cfg needs a guided batch [uncond; cond] of even size, "
                             f"got {b} rows")
        if self.base_tokens == "local_random":
            cells = random_cells(hw, self.sx, self.sy, generator).to(x.device)
            base = cell_indices(cells, hw[1], self.sx, self.sy).expand(b, -1)
        else:
            base = self.dynamic_base(x, hw, dynamics, align, generator)
        return split_by_similarity(normalized(x), base, int(n * ratio), self.recover_from)

    def dynamic_base(self, x, hw, dynamics, align, generator):
        """DaTo's base token per cell [B, nb]: argmax of gamma * D + noise_alpha * noise, per row;
        align: the conditional half takes the unconditional half's."""
        (h, w), (b, n, _) = hw, x.shape
        score = self.noise_alpha * noise((b, n), generator).to(x.device, torch.float32)
        if dynamics is not None:
            score = score + self.gamma * pooled(dynamics, hw).reshape(b, n).float()
        base = per_cell_argmax(score, h, w, self.sx, self.sy)
        return base[:b // 2].repeat(2, 1) if align else base

    def __post_init__(self):
        super().__post_init__()
        if self.gamma < 0:   # a weight: a negative one would prefer the tokens that change least
            raise ValueError(f"DaTo's gamma (the dynamics' weight) must be >= 0, got {self.gamma}")


class DaToRun(TokenRun):
    """DaTo across a run: the dynamics map D of each call, from the two previous raw UNet outputs,
    and for local_random one base pattern per call, shared by every block of it: a generator of
    its own per call, so the run's shared stream is left untouched (docs/methods.md)."""

    def begin_call(self, call, x, outputs):
        super().begin_call(call, x, outputs)
        dynamics = dynamics_map(*outputs) if self.method.base_tokens == "dynamics" else None
        self.dynamics = (dynamics if dynamics is not None and dynamics.shape[0] == x.shape[0]
                         else None)
        self.call_seed = self.stream(f"accel/call{call}")

    def plan(self, x, hw, ratio, guided):
        generator = self.generator
        if self.method.base_tokens == "local_random":
            generator = torch.Generator(generator.device).manual_seed(self.call_seed)
        return self.method.plan(x, hw, ratio, generator=generator, dynamics=self.dynamics,
                                guided=guided)


def dynamics_map(previous, latest):
    """D [B, h, w]: how much each latent position's prediction moved between two UNet calls, the
    channel mean of |latest - previous| over raw outputs [B, c, h, w] (the whole CFG batch, before
    guidance combines it). None when the two cannot be compared (different shapes)."""
    if previous is None or latest is None or previous.shape != latest.shape:
        return None
    return (latest.float() - previous.float()).abs().mean(dim=1)


def pooled(dynamics, hw):
    """D [B, h, w] at the latent's grid -> a block's grid [B, *hw] (average-pooled if deeper)."""
    if tuple(dynamics.shape[-2:]) == tuple(hw):
        return dynamics
    return F.adaptive_avg_pool2d(dynamics[:, None], hw)[:, 0]


def random_cells(hw, sx, sy, generator):
    """The local_random draw: a position (0 .. sx*sy-1, row-major) in every full cell, [h//sy,
    w//sx], on the generator's device; the official code's numbers from the same generator state
    (docs/methods.md)."""
    (h, w), device = hw, generator.device if generator is not None else "cpu"
    return torch.randint(sy * sx, (h // sy, w // sx), generator=generator, device=device)
