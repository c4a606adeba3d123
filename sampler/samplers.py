"""The samplers, as data: each name's step function, timesteps, UNet calls per run and whether it
takes η. Adding a sampler is one file with its step function and one row here; everything else
(the command-line choices, schedule checks, MAC counts) reads this table.

A step function runs a whole trajectory: fn(model, x_T, steps, alphas, eta, generator) yields
(i, t, x, pred_x0) after each step, where model(x, t, ᾱ) is the guided noise estimate at timestep
t for a latent at noise level ᾱ (sampler/loop.py makes it from the UNet).
"""
from collections.abc import Callable
from dataclasses import dataclass

from . import ddim, dpmpp, plms
from .schedule import alphas_cumprod, check_steps, ldm_timesteps


@dataclass(frozen=True)
class Sampler:
    """One sampler. run: its step function. timesteps(steps, alphas) -> the UNet's timesteps in
    sampling order. extra_calls: UNet calls beyond one per step (PLMS's first step: 1). takes_eta:
    it draws noise scaled by η (DDIM); the others are deterministic and need η = 0."""
    run: Callable
    timesteps: Callable
    extra_calls: int = 0
    takes_eta: bool = False
    about: str = ""

    def calls(self, steps):
        return steps + self.extra_calls


def ldm_order(steps, alphas):
    """LDM's uniform spacing in sampling order (PLMS and DDIM): 981, 961, ..., 1 for 50 steps."""
    return ldm_timesteps(steps)[::-1]


SAMPLERS = {
    "plms": Sampler(plms.plms_steps, ldm_order, extra_calls=1,
                    about="LDM's PLMS, what SD's and the papers' results use (50 steps: 51 UNet calls)"),
    "ddim": Sampler(ddim.ddim_steps, ldm_order, takes_eta=True,
                    about="LDM's DDIM; eta > 0 adds noise"),
    "dpmpp-2m": Sampler(dpmpp.dpmpp_2m_steps, dpmpp.timesteps,
                        about="DPM-Solver++(2M), diffusers' DPMSolverMultistepScheduler for SD 1.5 (20-25 steps)"),
    "dpmpp-2m-karras": Sampler(dpmpp.dpmpp_2m_karras_steps,
                               lambda steps, alphas: dpmpp.timesteps(steps, alphas, karras=True),
                               about="DPM-Solver++(2M) on Karras sigmas (use_karras_sigmas=True; 20-25 steps)"),
}


def find_sampler(name):
    """The Sampler named `name`; ValueError naming --sampler and the choices otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (--sampler); choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def unet_calls(steps, sampler="plms"):
    """UNet calls in a run of `steps` steps of `sampler` (PLMS-50: 51, DDIM-50 and DPM++-50: 50)."""
    check_steps(steps)
    return find_sampler(sampler).calls(steps)


def sampler_timesteps(sampler, steps):
    """The UNet's timesteps of a run, in sampling order."""
    check_steps(steps)
    return find_sampler(sampler).timesteps(steps, alphas_cumprod())
