"""Euler and Euler ancestral as diffusers' Euler(Ancestral)DiscreteScheduler run them for SD 1.5:
A1111's "Euler" and "Euler a" (sources: docs/samplers.md). One model call per step.

Both work on x = x0 + σ·eps (the variance-exploding latent, √(σ²+1) times the UNet's input):
    d = (x - x0) / σ,    x' = x + (σ' - σ)·d                                       Euler
Euler a steps to σ_down < σ' and adds fresh noise z of size σ_up (σ_down² + σ_up² = σ'²):
    σ_up = σ'·√(1 - σ'²/σ²),   σ_down = √(σ'² - σ_up²)
    x' = x + (σ_down - σ)·d + σ_up·z                                       Euler a

Timesteps: S fractional ones, linspace(0, 999, S) descending (20 steps: 999, 946.4, ..., 0),
each σ interpolated linearly between the training timesteps', then σ = 0. As diffusers does for
this spacing, a run starts at x = σ_max·x_T (not √(σ_max²+1)·x_T): a seed gives a diffusers
user's image.
"""
import torch

from .dpmpp import linspace, sigmas_of
from .schedule import MAX_STEPS


def schedule(steps, alphas):
    """(fractional timesteps in sampling order, their S + 1 values of σ, the last 0)."""
    table = sigmas_of(alphas).tolist()
    ts = linspace(0.0, float(MAX_STEPS), steps)[::-1]   # one step: [0], as diffusers
    return ts, [interpolated(table, t) for t in ts] + [0.0]


def interpolated(table, t):
    """σ at fractional timestep t, linear between the two training timesteps around it
    (numpy's interp)."""
    low = min(int(t), len(table) - 2)
    return table[low] + (t - low) * (table[low + 1] - table[low])


def euler_steps(model, x, ts, sigmas, eta=0.0, generator=None):
    """Yield (i, t, x_next, pred_x0) for each step of timesteps `ts` (sampling order), x_next
    as the UNet reads it (x / √(σ'²+1)). model(x, t, ᾱ) -> guided noise estimate;
    sigmas: the σ of each step, then 0. Deterministic: eta and generator are not used."""
    return ve_steps(model, x, ts, sigmas, None)


def euler_ancestral_steps(model, x, ts, sigmas, eta=0.0, generator=None):
    """As euler_steps, with fresh noise at each step drawn on the CPU from `generator` (the same
    draws as diffusers' step(..., generator=generator)), so a seed gives the same image on every
    device. eta: not used (Euler a is always fully ancestral, as in diffusers and A1111)."""
    return ve_steps(model, x, ts, sigmas, generator if generator is not None else torch.Generator())


def ve_steps(model, x, ts, sigmas, generator):
    """The Euler loop; ancestral when a generator is given."""
    x = x * sigmas[0]
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        scale = (sigma ** 2 + 1) ** 0.5
        eps = model(x / scale, t, 1 / scale ** 2)
        x0 = x - sigma * eps
        if generator is None:
            x = x + (sigma_next - sigma) * eps
        else:
            up = sigma_next * (1 - sigma_next ** 2 / sigma ** 2) ** 0.5
            x = x + ((sigma_next ** 2 - up ** 2) ** 0.5 - sigma) * eps
            if up:
                x = x + up * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        yield i, t, x / (sigma_next ** 2 + 1) ** 0.5, x0
