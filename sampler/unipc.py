"""UniPC, B(h) = e^{-h} - 1 ("bh2"), order 2, on data estimates, as diffusers'
UniPCMultistepScheduler runs it for SD 1.5 (its defaults; 10-20 steps; sources: docs/samplers.md).
One model call per step.

Each step is a predictor and, from the second step on, a corrector that needs no extra model call:
  UniP: from σ_i to σ_{i+1}, the DPM-Solver++(2M) step (sampler/dpmpp.py): first order at the
        first step; the last goes to σ = 0 and is x0 itself.
  UniC: once the model has been evaluated at x_{i+1}, x_{i+1} is recomputed from x_i with that
        new data estimate m_{i+1} added to the ones the predictor used (h = λ_{i+1} - λ_i,
        λ = -log σ):
            x_{i+1} = (s_{i+1} / s_i)·x_i - α_{i+1}·(e^{-h} - 1)·(m_i + Σ_k ρ_k·D_k)
        after a first-order step D = m_{i+1} - m_i with ρ = 1/2 (the trapezoid rule); after a
        second-order step also D_1 = (m_{i-1} - m_i) / r, r = (λ_{i-1} - λ_i) / h, with ρ
        solving UniC's 2x2 system.
The next step starts from the corrected x_{i+1} but reuses m_{i+1}, evaluated before the correction.
Timesteps as DPM++(2M)'s: round(linspace(0, 999, S + 1)) descending without the 0.
"""
import math

from .dpmpp import alpha_sigma, log_snr, update


def unipc_steps(model, x, ts, sigmas, eta=0.0, generator=None):
    """Yield (i, t, x_next, pred_x0) for each step of timesteps `ts` (sampling order).

    model(x, t, ᾱ) -> guided noise estimate; sigmas: the σ of each step, then 0.
    Deterministic: eta and generator are not used.
    """
    last = len(ts) - 1
    history = []   # (λ, x0) of the last two steps, newest last
    x_prev = None
    for i, t in enumerate(ts):
        a_s, s_s = alpha_sigma(sigmas[i])
        x0 = (x - s_s * model(x, t, a_s ** 2)) / a_s
        if i == last:   # to σ = 0: x0, whatever the corrector would have made of x
            yield i, t, x0, x0
            return
        if x_prev is not None:
            x = corrected(x_prev, sigmas[i - 1], sigmas[i], history, x0)
        history = (history + [(log_snr(sigmas[i]), x0)])[-2:]
        x_prev, x = x, update(x, x0, sigmas[i], sigmas[i + 1],
                              history[0] if len(history) == 2 else None)
        yield i, t, x, x0


def corrected(x, sigma_s, sigma_t, history, x0_t):
    """UniC: x at σ_t recomputed from x at σ_s, the estimates the predictor used (history:
    [(λ, x0)], one for a first-order step, two for a second-order one) and the new one x0_t."""
    s_s, (a_t, s_t) = alpha_sigma(sigma_s)[1], alpha_sigma(sigma_t)
    lambda_s, m = history[-1]
    h = log_snr(sigma_t) - lambda_s
    b_h = math.expm1(-h)
    if len(history) == 1:
        d = m + 0.5 * (x0_t - m)
    else:
        r = (history[0][0] - lambda_s) / h
        phi = b_h / -h - 1   # UniC's right-hand side: b_1 = φ_1 / B(h), b_2 = 2·φ_2 / B(h)
        b1, b2 = phi / b_h, 2 * (phi / -h - 0.5) / b_h
        rho_1 = (b1 - b2) / (1 - r)   # [1 1; r 1]·(ρ_1, ρ_t) = (b_1, b_2)
        d = m + rho_1 * (history[0][1] - m) / r + (b1 - rho_1) * (x0_t - m)
    return (s_t / s_s) * x - a_t * b_h * d
