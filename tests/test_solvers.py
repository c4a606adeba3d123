"""The samplers diffusers has, against its schedulers as an SD 1.5 user gets them: from_config(SD 1.5's
scheduler_config.json). DPM-Solver++(2M) with and without Karras sigmas, UniPC, Euler and Euler
ancestral: the same denoiser, noise and guidance (and, for Euler a, the same generator draws) must give
the same timesteps, the same number of model calls and the same final latent."""
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from accel import Acceleration, Gate, Guidance, Skip
from cache import FULL, CacheSchedule
from conftest import tiny_unet
from prune import token_method
from sampler import sample, sampler_timesteps, stream_seed, unet_calls

# stable-diffusion-v1-5's scheduler/scheduler_config.json (a PNDMScheduler config)
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SAMPLERS = {"dpmpp-2m": (DPMSolverMultistepScheduler, {}),
            "dpmpp-2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
            "unipc": (UniPCMultistepScheduler, {}),
            "euler": (EulerDiscreteScheduler, {}),
            "euler-a": (EulerAncestralDiscreteScheduler, {})}


def scheduler(name, prediction="epsilon"):
    kind, options = SAMPLERS[name]
    return kind.from_config(SD15_SCHEDULER, prediction_type=prediction, **options)


class Denoiser:
    """A nonlinear stand-in for the UNet that reads x, t and the context, and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, context):
        self.calls += 1
        w = (t.to(torch.float64) / 1000).view(-1, 1, 1, 1).to(x.dtype)
        c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(x * (0.5 + w)) * 0.9 + 0.3 * c * x.roll(1, dims=-1) - 0.1 * w


def diffusers_loop(unet, x_T, cond, uncond, steps, scale, name, prediction, seed):
    """diffusers' StableDiffusionPipeline denoising loop; Euler a draws from the generator sampler.loop
    seeds for it."""
    sched = scheduler(name, prediction)
    sched.set_timesteps(steps)
    noise = {"generator": torch.Generator().manual_seed(stream_seed(seed, "euler-a"))} if name == "euler-a" else {}
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(torch.cat([x, x]), t)
        out = unet(x_in, t.expand(2 * x.shape[0]), torch.cat([uncond, cond]))
        e_uncond, e_cond = out.chunk(2)
        x = sched.step(e_uncond + scale * (e_cond - e_uncond), t, x, **noise).prev_sample
    return x


@pytest.mark.parametrize("name", SAMPLERS)
def test_timesteps_equal_diffusers(name):
    for steps in [*range(1, 61), 75, 100, 150, 250, 500, 999]:
        sched = scheduler(name)
        sched.set_timesteps(steps)
        ours = torch.tensor(sampler_timesteps(name, steps), dtype=sched.timesteps.dtype)
        assert torch.allclose(ours, sched.timesteps, rtol=0, atol=1e-4), steps
        assert unet_calls(steps, name) == steps
    assert sampler_timesteps("dpmpp-2m", 20)[:2] == [999, 949] and sampler_timesteps("dpmpp-2m", 20)[-1] == 50
    assert sampler_timesteps("dpmpp-2m-karras", 20)[:2] == [999, 962]
    assert sampler_timesteps("dpmpp-2m-karras", 20)[-2:] == [2, 0]
    assert sampler_timesteps("unipc", 20) == sampler_timesteps("dpmpp-2m", 20)
    assert sampler_timesteps("euler", 20)[:2] == [999.0, pytest.approx(946.4211, abs=1e-4)]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [10, 20, 25])
def test_final_latent_equals_diffusers(name, steps, prediction):
    g = torch.Generator().manual_seed(steps)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 77, 16, generator=g), torch.randn(2, 77, 16, generator=g)
    ours, theirs = Denoiser(), Denoiser()
    got = sample(ours, x_T, cond, uncond, steps=steps, scale=7.5, method=name, prediction=prediction, seed=steps)
    want = diffusers_loop(theirs, x_T, cond, uncond, steps, 7.5, name,
                          "epsilon" if prediction == "eps" else "v_prediction", seed=steps)
    assert ours.calls == theirs.calls == steps
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert not torch.equal(got, x_T)


NEW = ["unipc", "euler", "euler-a"]
METHODS = {   # every kind of plan keyed by UNet-call index, on a 6-step run
    "deepcache depth 2": Acceleration(cache=CacheSchedule("uniform", interval=3, depth=2)),
    "dato depths, forecast": Acceleration(cache=CacheSchedule("dato", depths=(FULL, 1, 0, FULL, 2, FULL), order=1)),
    "sito": Acceleration(prune=token_method("sito", ratio=0.5)),
    "dato dynamics + cache": Acceleration(prune=token_method("dato", ratio=0.4),
                                          cache=CacheSchedule("uniform", interval=2, depth=1)),
    "guidance window, reuse, skip": Acceleration(guidance=Guidance(window=(3.0, 20.0), outside="reuse"),
                                                 skip=Skip((3,))),
    "t-gate": Acceleration(gate=Gate(3)),
    "adaptive guidance": Acceleration(guidance=Guidance(stop=0.5)),
    "timesteps": Acceleration(timesteps=(999, 800, 600, 400, 200, 50)),
}


class Counted:
    def __init__(self, unet):
        self.unet, self.calls = unet, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.unet(*args, **kwargs)


@pytest.mark.parametrize("name", NEW)
def test_every_plan_runs_on_the_new_samplers_and_acts(name):
    """Each plan changes the run's latent, makes the UNet calls its plans say (a skipped call makes none) and
    gives the same latent twice (Euler a: the same noise for the same seed)."""
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    cond, uncond = (torch.randn(2, 77, unet.config.context_dim, generator=g) for _ in range(2))
    plain = sample(unet, x, cond, uncond, steps=6, method=name, seed=3)
    assert torch.equal(plain, sample(unet, x, cond, uncond, steps=6, method=name, seed=3))
    for label, accel in METHODS.items():
        counted = Counted(unet)
        got = sample(counted, x, cond, uncond, steps=6, method=name, accel=accel, seed=3)
        assert torch.isfinite(got).all() and (got - plain).abs().mean() > 1e-4, label
        assert counted.calls == 6 - len(accel.skip.calls if accel.skip else ()), label
    if name == "euler-a":
        assert (sample(unet, x, cond, uncond, steps=6, method=name, seed=4) - plain).abs().mean() > 1e-2
