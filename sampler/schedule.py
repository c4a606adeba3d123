"""The noise schedule and timestep spacing of LDM (what SD was trained with and the papers sampled with),
and the DDIM update PLMS and DDIM share."""
import torch

TRAIN_STEPS = 1000
MAX_STEPS = TRAIN_STEPS - 1   # the +1 shift must stay on the schedule (t <= 999)


def alphas_cumprod(start=0.00085, end=0.012, n=TRAIN_STEPS, dtype=torch.float64):
    """ᾱ_t = prod_{s<=t} (1 - β_s) with LDM's "linear" schedule: β linear in sqrt space,
    β = linspace(√start, √end, n)². [n], float64 (float32: diffusers' table, to the bit)."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=dtype) ** 2
    return torch.cumprod(1 - betas, dim=0)


def check_steps(steps):
    """Raise ValueError unless `steps` is a step count every sampler can run (1 to 999)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"--steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")


def ldm_timesteps(steps):
    """LDM's uniform spacing with its +1 shift, ascending: t_i = 1 + i * (1000 // steps).

    50 steps -> [1, 21, ..., 981], exactly LDM's range(0, 1000, 1000 // steps) + 1 (the shift,
    per LDM's comment, puts the final step's alphas right). For step counts that do not divide
    1000, LDM's range appends extra steps (30 -> 31 steps, 400 -> 500) and for some counts
    (3, 9, 27, ...) runs past the schedule and crashes; here `steps` steps are exactly `steps`,
    the prefix of LDM's list, which is what diffusers' DDIM/PNDM ("leading", offset 1) take too."""
    check_steps(steps)
    return [1 + i * (TRAIN_STEPS // steps) for i in range(steps)]


def step_alphas(ts, alphas):
    """(ᾱ_t, ᾱ_prev) for each step of timesteps `ts` in sampling order (descending).
    The last step goes to ᾱ[0], not to 1, as in LDM."""
    prev = list(ts[1:]) + [0]
    return [(alphas[t].item(), alphas[p].item()) for t, p in zip(ts, prev, strict=True)]


def ddim_update(x, eps, a_t, a_prev, sigma=0.0, noise=None):
    """One deterministic-or-noisy DDIM update from ᾱ_t to ᾱ_prev with noise estimate eps.

    pred_x0 = (x - √(1-ᾱ_t)·eps) / √ᾱ_t
    x_prev  = √ᾱ_prev·pred_x0 + √(1-ᾱ_prev-σ²)·eps + σ·noise
    Returns (x_prev, pred_x0)."""
    pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    x_prev = a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if sigma:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0
