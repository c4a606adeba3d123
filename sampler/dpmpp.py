"""DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler runs it for
SD 1.5. One model call per step.

In the noise level σ = √((1-ᾱ)/ᾱ) (α_σ = 1/√(σ²+1), s_σ = σ·α_σ, λ = log(α_σ / s_σ)), each step
turns the noise estimate into the data estimate x0 = (x - s_σ·eps) / α_σ, then moves to σ_{i+1}:
    x' = (s_{i+1} / s_i)·x - α_{i+1}·(e^{-h} - 1)·D,   h = λ_{i+1} - λ_i
    D = x0                                   first order (the first step and the last)
    D = x0 + (x0 - x0_prev) / (2 r),  r = (λ_i - λ_{i-1}) / h      second order ("midpoint")
The last step goes to σ = 0, where the update is x0 itself.

Timesteps: "linspace" spacing, round(linspace(0, 999, S + 1)) descending without the 0 (20
steps: 999, 949, ..., 50), σ read off the training schedule; with Karras sigmas (-karras), S
values of σ spaced as ρ = 7 interpolates from σ(999) to σ(0), each timestep the rounded log-σ
interpolation of its σ (20 steps: 999, 962, ..., 2, 0).
"""
import math

import torch

from .schedule import MAX_STEPS, alphas_cumprod

KARRAS_RHO = 7.0


def sigmas_of(alphas):
    return ((1 - alphas) / alphas).sqrt()


def linspace(start, stop, num):
    """numpy's linspace to the bit (start + i * step, the end point exact), so the rounded timesteps
    are diffusers' at every step count."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    return [start + i * step for i in range(num - 1)] + [stop]


def timestep_of(sigma, log_sigmas):
    """The fractional timestep whose σ is `sigma`: linear interpolation of log σ between the two
    neighbouring training timesteps (clamped to the schedule)."""
    log_sigma = math.log(max(sigma, 1e-10))
    low = min(max(int(torch.searchsorted(log_sigmas, log_sigma, right=True)) - 1, 0),
              len(log_sigmas) - 2)
    lo, hi = log_sigmas[low].item(), log_sigmas[low + 1].item()
    w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def schedule(steps, alphas, karras=False):
    """(timesteps in sampling order, their S + 1 values of σ, the last 0). Karras sigmas come from
    the float32 table of ᾱ, as diffusers derives them (so the UNet is called at its timesteps)."""
    if karras:
        sigmas = sigmas_of(alphas_cumprod(dtype=torch.float32))
        lo, hi = sigmas[0].item() ** (1 / KARRAS_RHO), sigmas[-1].item() ** (1 / KARRAS_RHO)
        levels = [(hi + r * (lo - hi)) ** KARRAS_RHO for r in linspace(0.0, 1.0, steps)]
        log_sigmas = sigmas.log()
        return [round(timestep_of(s, log_sigmas)) for s in levels], levels + [0.0]
    ts = [round(v) for v in linspace(0.0, float(MAX_STEPS), steps + 1)][::-1][:-1]
    return ts, sigma_levels(ts, alphas)


def sigma_levels(ts, alphas):
    """The noise levels σ of timesteps `ts` in sampling order, then 0 (the run ends on data)."""
    return [sigmas_of(alphas[t]).item() for t in ts] + [0.0]


def alpha_sigma(sigma):
    """(α, s) of noise level σ: x = α·x0 + s·eps."""
    alpha = 1 / (sigma ** 2 + 1) ** 0.5
    return alpha, sigma * alpha


def dpmpp_2m_steps(model, x, ts, sigmas, eta=0.0, generator=None):
    """Yield (i, t, x_next, pred_x0) for each step of timesteps `ts` (sampling order).

    model(x, t, ᾱ) -> guided noise estimate; sigmas: the σ of each step, then the σ the run ends
    at (0; for Karras sigmas the levels lie between the training timesteps, ᾱ = α_σ²).
    Deterministic: eta and generator are not used.
    """
    last = len(ts) - 1
    prev = None   # the previous step's (λ, x0)
    for i, t in enumerate(ts):
        a_s, s_s = alpha_sigma(sigmas[i])
        x0 = (x - s_s * model(x, t, a_s ** 2)) / a_s
        x = x0 if i == last else update(x, x0, sigmas[i], sigmas[i + 1], prev)   # to σ = 0: x0
        prev = (log_snr(sigmas[i]), x0)
        yield i, t, x, x0


def log_snr(sigma):
    """λ = log(α_σ / s_σ) (= -log σ)."""
    alpha, s = alpha_sigma(sigma)
    return math.log(alpha / s)


def update(x, x0, sigma_s, sigma_t, prev=None):
    """One DPM-Solver++ step from σ_s to σ_t > 0 with data estimate x0: first order, or second
    order on the previous step's prev = (λ, x0). The last step, to σ = 0, is x0 itself."""
    s_s, (a_t, s_t) = alpha_sigma(sigma_s)[1], alpha_sigma(sigma_t)
    h = log_snr(sigma_t) - log_snr(sigma_s)
    x = (s_t / s_s) * x - (a_t * math.expm1(-h)) * x0
    if prev is not None:   # second-order correction; reordering its operations changes the rounding
        r = (log_snr(sigma_s) - prev[0]) / h
        x = x - 0.5 * (a_t * math.expm1(-h)) * ((x0 - prev[1]) / r)
    return x
