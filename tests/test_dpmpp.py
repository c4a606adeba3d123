"""DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler as an SD 1.5 user gets it:
from_config(SD 1.5's scheduler_config.json), with and without Karras sigmas. The same denoiser,
noise and guidance must give the same timesteps, the same number of model calls and the same
final latent."""
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from sampler import sample, sampler_timesteps, unet_calls

# stable-diffusion-v1-5's scheduler/scheduler_config.json (a PNDMScheduler config)
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SAMPLERS = {"dpmpp-2m": False, "dpmpp-2m-karras": True}


def scheduler(karras, prediction="epsilon"):
    return DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER, use_karras_sigmas=karras,
                                                   prediction_type=prediction)


class Denoiser:
    """A nonlinear stand-in for the UNet that reads x, t and the context, and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, context):
        self.calls += 1
        w = (t.to(torch.float64) / 1000).view(-1, 1, 1, 1).to(x.dtype)
        c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(x * (0.5 + w)) * 0.9 + 0.3 * c * x.roll(1, dims=-1) - 0.1 * w


def diffusers_loop(unet, x_T, cond, uncond, steps, scale, karras, prediction):
    sched = scheduler(karras, prediction)
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(torch.cat([x, x]), t.expand(2 * x.shape[0]), torch.cat([uncond, cond]))
        e_uncond, e_cond = out.chunk(2)
        x = sched.step(e_uncond + scale * (e_cond - e_uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("name", SAMPLERS)
def test_timesteps_equal_diffusers(name):
    for steps in [*range(1, 61), 75, 100, 150, 250, 500, 999]:
        sched = scheduler(SAMPLERS[name])
        sched.set_timesteps(steps)
        assert sampler_timesteps(name, steps) == sched.timesteps.tolist(), steps
        assert unet_calls(steps, name) == steps
    assert sampler_timesteps("dpmpp-2m", 20)[:2] == [999, 949] and sampler_timesteps("dpmpp-2m", 20)[-1] == 50
    assert sampler_timesteps("dpmpp-2m-karras", 20)[:2] == [999, 962]
    assert sampler_timesteps("dpmpp-2m-karras", 20)[-2:] == [2, 0]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [10, 20, 25])
def test_final_latent_equals_diffusers(name, steps, prediction):
    g = torch.Generator().manual_seed(steps)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 77, 16, generator=g), torch.randn(2, 77, 16, generator=g)
    ours, theirs = Denoiser(), Denoiser()
    got = sample(ours, x_T, cond, uncond, steps=steps, scale=7.5, method=name, prediction=prediction)
    want = diffusers_loop(theirs, x_T, cond, uncond, steps, 7.5, SAMPLERS[name],
                          "epsilon" if prediction == "eps" else "v_prediction")
    assert ours.calls == theirs.calls == steps
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert not torch.equal(got, x_T)
