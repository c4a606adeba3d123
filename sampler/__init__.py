"""Sampling: the samplers (one file each, listed in samplers.py), the denoising loop (loop.py) and
the generation API on a loaded model (generate.py).

    from sampler import sample
    latent = sample(unet, x_T, cond, uncond, steps=20, scale=7.5, method="dpmpp-2m")
"""
from .loop import (
    PLAIN,
    CallPlan,
    Step,
    check_args,
    final_latent,
    final_step,
    sample,
    sample_steps,
    stream_seed,
)
from .samplers import (
    SAMPLERS,
    Sampler,
    call_sigmas,
    find_sampler,
    run_schedule,
    sampler_timesteps,
    unet_calls,
)

__all__ = ["sample", "sample_steps", "final_latent", "final_step", "Step", "unet_calls",
           "check_args", "SAMPLERS", "Sampler", "find_sampler", "sampler_timesteps", "stream_seed",
           "CallPlan", "PLAIN", "run_schedule", "call_sigmas"]
