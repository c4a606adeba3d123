"""The samplers, as data: each name's step function, timesteps, UNet calls per run and whether it
takes η. Adding a sampler is one file with its step function and one row here; everything else
(the command-line choices, schedule checks, MAC counts) reads this table.

A step function runs a whole trajectory: fn(model, x_T, ts, levels, eta, generator) yields
(i, t, x, pred_x0) after each step, where ts are the run's timesteps in sampling order, levels
their noise levels in the sampler's own terms (ᾱ for PLMS/DDIM, σ for DPM++; one more than ts:
the level the run ends at) and model(x, t, ᾱ) is the guided noise estimate at timestep t for a
latent at noise level ᾱ (sampler/loop.py makes it from the UNet). The loop computes ts and levels
once (`schedule`) and hands them in: a run's timesteps are data (docs/samplers.md).
"""
import math
from collections.abc import Callable
from dataclasses import dataclass

from . import ddim, dpmpp, euler, plms, unipc
from .schedule import (
    SettingError,
    alpha_levels,
    alphas_cumprod,
    check_steps,
    check_timesteps,
    ldm_timesteps,
)


@dataclass(frozen=True)
class Sampler:
    """One sampler. run: its step function. schedule(steps, alphas) -> (its timesteps in sampling
    order, their levels); levels_of(ts, alphas) -> the levels of given timesteps; sigma(level) ->
    σ = √((1-ᾱ)/ᾱ) of one of its levels. extra_calls: UNet calls beyond one per step (PLMS's
    first step evaluates the next timestep too: 1). takes_eta: it draws noise scaled by η (DDIM);
    the others need η = 0. stream: the name of the random stream its noise is drawn from (DDIM,
    Euler a), "" if it draws none."""
    run: Callable
    schedule: Callable
    levels_of: Callable
    sigma: Callable
    extra_calls: int = 0
    takes_eta: bool = False
    stream: str = ""
    about: str = ""

    def calls(self, steps):
        return steps + self.extra_calls

    def call_sigmas(self, levels):
        """The noise level σ of each UNet call of a run on `levels`: one call per step, and the
        extra calls (PLMS's first step) at the second step's level."""
        sigmas = [self.sigma(level) for level in levels[:-1]]
        return sigmas[:1] + [sigmas[min(1, len(sigmas) - 1)]] * self.extra_calls + sigmas[1:]


def ldm_schedule(steps, alphas):
    """LDM's uniform spacing in sampling order (PLMS and DDIM): 981, 961, ..., 1 for 50 steps."""
    ts = ldm_timesteps(steps)[::-1]
    return ts, alpha_levels(ts, alphas)


def sigma_of_alpha(a):
    """σ = √((1-ᾱ)/ᾱ) of a PLMS/DDIM level ᾱ."""
    return math.sqrt((1 - a) / a)


def karras_schedule(steps, alphas):
    return dpmpp.schedule(steps, alphas, karras=True)


SAMPLERS = {
    "plms": Sampler(plms.plms_steps, ldm_schedule, alpha_levels, sigma_of_alpha, extra_calls=1,
                    about="LDM's PLMS, what SD's and the papers' results use "
                          "(50 steps: 51 UNet calls)"),
    "ddim": Sampler(ddim.ddim_steps, ldm_schedule, alpha_levels, sigma_of_alpha, takes_eta=True,
                    stream="ddim", about="LDM's DDIM; eta > 0 adds noise"),
    "dpmpp-2m": Sampler(dpmpp.dpmpp_2m_steps, dpmpp.schedule, dpmpp.sigma_levels, float,
                        about="DPM-Solver++(2M), diffusers' DPMSolverMultistepScheduler "
                              "for SD 1.5 (20-25 steps)"),
    "dpmpp-2m-karras": Sampler(dpmpp.dpmpp_2m_steps, karras_schedule, dpmpp.sigma_levels, float,
                               about="DPM-Solver++(2M) on Karras sigmas "
                                     "(use_karras_sigmas=True; 20-25 steps)"),
    "unipc": Sampler(unipc.unipc_steps, dpmpp.schedule, dpmpp.sigma_levels, float,
                     about="UniPC (bh2, order 2), diffusers' UniPCMultistepScheduler "
                           "for SD 1.5 (10-20 steps)"),
    "euler": Sampler(euler.euler_steps, euler.schedule, dpmpp.sigma_levels, float,
                     about="Euler, diffusers' EulerDiscreteScheduler and A1111's Euler "
                           "(20-30 steps)"),
    "euler-a": Sampler(euler.euler_ancestral_steps, euler.schedule, dpmpp.sigma_levels, float,
                       stream="euler-a",
                       about="Euler ancestral, diffusers' EulerAncestralDiscreteScheduler, "
                             "A1111's default (20-30)"),
}


def find_sampler(name):
    """The Sampler named `name`; SettingError naming the choices otherwise."""
    if name not in SAMPLERS:
        raise SettingError("sampler", f"{name!r} is an unknown sampler; "
                                      f"choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def unet_calls(steps, sampler="plms"):
    """UNet calls in a run of `steps` steps of `sampler` (PLMS-50: 51, DDIM-50, DPM++-50: 50)."""
    check_steps(steps)
    return find_sampler(sampler).calls(steps)


def run_schedule(sampler, steps, timesteps=None):
    """(timesteps in sampling order, their levels) of a run: the sampler's own spacing, or the
    given `timesteps` (one per step, descending) with the levels the sampler reads for them."""
    check_steps(steps)
    found, alphas = find_sampler(sampler), alphas_cumprod()
    if timesteps is None:
        return found.schedule(steps, alphas)
    check_timesteps(timesteps, steps)
    return list(timesteps), found.levels_of(list(timesteps), alphas)


def sampler_timesteps(sampler, steps):
    """The UNet's timesteps of a run, in sampling order."""
    return run_schedule(sampler, steps)[0]


def call_sigmas(sampler, steps, timesteps=None):
    """The noise level σ of each UNet call of a run (what a guidance window or forecast reads)."""
    return find_sampler(sampler).call_sigmas(run_schedule(sampler, steps, timesteps)[1])
