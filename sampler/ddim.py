"""DDIM (Song et al.) as LDM's ddim.py runs it: one model call per step; η = 0 is deterministic,
η = 1 is DDPM-like ancestral sampling."""
import torch

from .schedule import ddim_update, ldm_timesteps, step_alphas


def ddim_steps(model, x, steps, alphas, eta=0.0, generator=None):
    """Yield (i, t, x_prev, pred_x0) for each of `steps` steps.

    model(x, t, ᾱ) -> guided noise estimate; σ_t = η·√((1-ᾱ_prev)/(1-ᾱ_t))·√(1-ᾱ_t/ᾱ_prev);
    the noise is drawn on the CPU from `generator` so a seed gives the same image on every device.
    """
    ts = ldm_timesteps(steps)[::-1]
    for i, (t, (a_t, a_prev)) in enumerate(zip(ts, step_alphas(ts, alphas), strict=True)):
        eps = model(x, t, a_t)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if sigma else None
        x, pred_x0 = ddim_update(x, eps, a_t, a_prev, sigma, noise)
        yield i, t, x, pred_x0
