"""The noise schedule and timestep spacing of LDM (what SD was trained with and the papers sampled
with), and the DDIM update PLMS and DDIM share."""
import torch

TRAIN_STEPS = 1000
MAX_STEPS = TRAIN_STEPS - 1   # the +1 shift must stay on the schedule (t <= 999)


def alphas_cumprod(start=0.00085, end=0.012, n=TRAIN_STEPS, dtype=torch.float64):
    """ᾱ_t = prod_{s<=t} (1 - β_s) with LDM's "linear" schedule: β linear in sqrt space,
    β = linspace(√start, √end, n)². [n], float64 (float32: diffusers' table, to the bit)."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=dtype) ** 2
    return torch.cumprod(1 - betas, dim=0)


def ldm_timesteps(steps):
    """LDM's uniform spacing with its +1 shift, ascending: t_i = 1 + i * (1000 // steps).

    50 steps -> [1, 21, ..., 981], LDM's range(0, 1000, 1000 // steps) + 1. For step counts that
    do not divide 1000 this is exactly `steps` steps, the prefix of LDM's list (LDM adds a few, and
    crashes for some counts: docs/samplers.md)."""
    return [1 + i * (TRAIN_STEPS // steps) for i in range(steps)]


def alpha_levels(ts, alphas):
    """The noise levels ᾱ of PLMS and DDIM for timesteps `ts` in sampling order (descending):
    ᾱ_t of each, then the level the last step goes to, ᾱ[0] (not 1, as in LDM)."""
    return [alphas[t].item() for t in ts] + [alphas[0].item()]


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


class SettingError(ValueError):
    """A bad sampling setting, named by its API argument (`name`: steps, scale, seed, ...); the
    command-line tools name the flag that set it instead (sampler/cli.py, run_tool)."""

    def __init__(self, name, problem):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


def check_steps(steps):
    """Raise SettingError unless `steps` is a step count every sampler can run (1 to 999)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise SettingError("steps", f"must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")


def check_timesteps(timesteps, steps):
    """Raise ValueError unless `timesteps` are `steps` whole training timesteps, strictly descending
    (the order a run visits them), e.g. Align Your Steps' SD1.5 ten: 999, 850, ..., 24."""
    if not isinstance(timesteps, (tuple, list)) or any(isinstance(t, bool) or not isinstance(t, int)
                                                       for t in timesteps):
        raise ValueError("timesteps must be a list of whole training timesteps, "
                         f"got {timesteps!r}")
    if len(timesteps) != steps:
        raise ValueError(f"{len(timesteps)} timesteps for a run of {steps} steps: "
                         "give one per step")
    descending = all(a > b for a, b in zip(timesteps, timesteps[1:], strict=False))
    if not all(0 <= t <= MAX_STEPS for t in timesteps) or not descending:
        raise ValueError(f"timesteps must run strictly down within 0 .. {MAX_STEPS} "
                         f"(sampling order), got {list(timesteps)}")
