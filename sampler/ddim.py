"""DDIM as LDM's ddim.py runs it: one model call per step; η = 0 is deterministic, η = 1 is
DDPM-like ancestral sampling (sources: docs/samplers.md)."""
import torch

from .schedule import ddim_update


def ddim_steps(model, x, ts, levels, eta=0.0, generator=None):
    """Yield (i, t, x_prev, pred_x0) for each step of timesteps `ts` (sampling order).

    model(x, t, ᾱ) -> guided noise estimate; levels: ᾱ of each timestep, then the run's last
    level; σ_t = η·√((1-ᾱ_prev)/(1-ᾱ_t))·√(1-ᾱ_t/ᾱ_prev); the noise is drawn on the
    CPU from `generator` so a seed gives the same image on every device.
    """
    for i, t in enumerate(ts):
        a_t, a_prev = levels[i], levels[i + 1]
        eps = model(x, t, a_t)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        noise = (torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if sigma
                 else None)
        x, pred_x0 = ddim_update(x, eps, a_t, a_prev, sigma, noise)
        yield i, t, x, pred_x0
