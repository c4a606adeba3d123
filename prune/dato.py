"""DaTo (Zhang et al., 2025): dynamics-aware token pruning.

Like SiTo, but the base token of each cell is the one whose noise prediction changed most
between the two previous UNet calls: score = gamma * D + noise_alpha * N(0, 1), with D the
channel-mean |eps_k - eps_(k-1)| of the raw UNet outputs, pooled to the block's grid. Base tokens
carry the dynamics through self-attention, which keeps cached steps (cache/) from going stale.
In a guided run (batch = [uncond; cond]) align_cfg uses the unconditional half's base tokens
for the conditional half too.

Not reproduced from the official code (see README): its random sign flip of D on half the block
calls, the unused N x N SimScore it computes, and its constant ratio 0.4 (the schedule here works).
"""
import torch

from .tokens import check_ratio, noise, normalized, per_cell_argmax, split_by_similarity


def plan(x, hw, ratio, *, dynamics=None, gamma=1.0, noise_alpha=0.1, align_cfg=False, recover_from="kept",
         sx=2, sy=2, generator=None):
    """x [B, h*w, C] (the block input) -> (prune, recover) as a TokenPlan.

    dynamics: D [B, h, w] (None before two UNet outputs exist: base tokens then come from the noise).
    gamma: weight of D (1.0, as DaTo's evaluation scripts); noise_alpha: noise weight (0.1).
    align_cfg: x is a guided batch [uncond; cond]: share the base tokens between the halves (False;
        inside a run, TokenPruning sets it for guided runs unless its align_cfg is off).
    ratio: fraction of all tokens pruned (DaTo's searches span 0.3-0.7; at most 1 - 1/(sx*sy)).
    """
    check_ratio(ratio, sx, sy)
    (h, w), (b, n, _) = hw, x.shape
    if align_cfg and b % 2:
        raise ValueError(f"align_cfg needs a guided batch [uncond; cond] of even size, got {b} rows")
    score = noise_alpha * noise((b, n), generator).to(x.device, torch.float32)
    if dynamics is not None:
        score = score + gamma * dynamics.reshape(b, n).float()
    base = per_cell_argmax(score, h, w, sx, sy)
    if align_cfg:
        base = base[:b // 2].repeat(2, 1)
    return split_by_similarity(normalized(x), base, int(n * ratio), recover_from)
