"""The denoising loop: classifier-free guidance, eps or v prediction, any sampler of the table.

    latent = sample(unet, x_T, cond, uncond, steps=50, scale=7.5, method="plms")

`unet` is any callable unet(x, t, context) -> tensor (with `accel`, it is also given the run's
state as the keyword `state`, see model.unet.RunState). `sample_steps` is the same loop as a
generator that yields a Step after every step, for progress bars, previews and timing.
"""
import hashlib
import itertools
import math
from collections import deque
from dataclasses import dataclass

import torch

from model.config import PREDICTIONS

from .samplers import call_sigmas, find_sampler, run_schedule
from .schedule import SettingError, check_steps


def stream_seed(seed, stream):
    """The seed of the random stream named `stream` in the run seeded `seed`. The run's x_T is
    drawn from `seed` itself; hashing keeps the other streams (DDIM noise, token selection)
    independent of it and of each other."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:8], "little")


GUIDANCE = {"both": 1.0, "cond": 0.5, "reuse": 0.5}   # mode -> its share of a guided call's batch


@dataclass(frozen=True)
class CallPlan:
    """How one UNet call of a run is made (an accelerated run's plans, accel/run.py).

    guidance: "both" (the guided batch [uncond; cond]), "cond" (the conditional branch alone) or
    "reuse" (the conditional branch plus the last guided call's difference, accel/guidance.py);
    depth: its cache depth (FULL, 12: the whole UNet; model.unet.RunState); ratio: its token
    method's ratio (0: off); skip: no UNet call, the estimate extrapolated (accel/skip.py); cross:
    what it does with its cross-attention, "compute", "keep" (compute and keep it: the gate call)
    or "cached" (read the kept one; T-GATE, accel/gate.py)."""
    guidance: str = "both"
    depth: int = 12
    ratio: float = 0.0
    skip: bool = False
    cross: str = "compute"

    @property
    def share(self):
        """Its UNet batch relative to a guided call's: 1, 0.5 for one branch, 0 when skipped."""
        return 0.0 if self.skip else GUIDANCE[self.guidance]


PLAIN = CallPlan()   # the plain call: both branches, the whole UNet, nothing pruned

MAX_SCALE = 100   # the highest guidance accepted; SD is used at 5-15


@dataclass
class Step:
    index: int              # 0-based step number
    steps: int              # number of steps in the run
    t: int                  # timestep of this step
    x: torch.Tensor         # latent after the step
    pred_x0: torch.Tensor   # the model's estimate of the clean latent at this step
    calls: int              # UNet calls so far
    stops: list | None = None   # adaptive guidance: each image's first unguided call (-1: none)


def sample_steps(unet, x_T, cond, uncond=None, steps=50, scale=7.5, method="plms", eta=0.0,
                 prediction="eps", accel=None, seed=0):
    """Run the sampler, yielding a Step after each step.

    x_T: [B, c, h, w] initial noise; cond / uncond: [B, 77, C] contexts (uncond None or
    scale == 1: no guidance, one conditional call per evaluation), or dicts of the UNet's keyword
    inputs (SDXL: context and y, from StableDiffusion.condition). Guidance batches one call on
    [x; x] with contexts [uncond; cond]: eps = eps_u + scale * (eps_c - eps_u). v-prediction
    outputs are converted per call: eps = √ᾱ·v + √(1-ᾱ)·x at the latent's noise level ᾱ.
    accel: an accel.Acceleration (or None); its per-run state is made here, and each UNet call is
    made as its CallPlan says. `seed` (the one x_T was drawn from) seeds the run's random streams
    (DDIM's noise when eta > 0, the token methods' choices), each through its own stream_seed.
    """
    check_args(steps, scale, method, eta, prediction)
    for name, c in (("cond", cond), ("uncond", uncond)):
        rows = (c.shape[0] if torch.is_tensor(c) else
                len(next(iter(c.values()))) if isinstance(c, dict) else None)
        if c is not None and rows != x_T.shape[0]:
            raise ValueError(f"{name} holds {rows} conditionings for {x_T.shape[0]} latents in "
                             "x_T: give one per image")
    if accel is not None:
        accel.check(find_sampler(method).calls(steps),
                    call_sigmas(method, steps, accel.timesteps or None))
    return run_steps(unet, x_T, cond, uncond, steps, scale, method, eta, prediction, accel, seed)


def run_steps(unet, x_T, cond, uncond, steps, scale, method, eta, prediction, accel, seed):
    """sample_steps on settings already checked (by sample_steps, or by Sampling for generate())."""
    sampler = find_sampler(method)
    ts, levels = run_schedule(method, steps, accel.timesteps or None if accel is not None else None)
    guided = uncond is not None and scale != 1
    state = (accel.start(sampler.calls(steps), seed, guided, sampler.call_sigmas(levels))
             if accel is not None else None)
    indices, calls = itertools.count(), 0

    def model(x, t, a):
        nonlocal calls
        index = next(indices)   # of this evaluation among the run's UNet calls, made or skipped
        plan = state.plans[index] if state is not None else PLAIN
        if plan.skip:
            out = state.extrapolated()
            state.end_call(None, out)
            return out
        both = guided and plan.guidance == "both"
        rows = state.guided_rows() if both and state is not None else None   # None: all guided
        if both:
            x_u, c_u = (x, uncond) if rows is None else (x[rows], picked(uncond, rows))
            x_in, c_in = torch.cat([x_u, x]), joined(c_u, cond)
        else:
            x_in, c_in = x, cond
        t_in = torch.full((x_in.shape[0],), t, device=x.device)
        args, kwargs = ((c_in,), {}) if torch.is_tensor(c_in) else ((), c_in)
        if state is None:
            raw = unet(x_in, t_in, *args, **kwargs)
        else:
            state.begin_call(index, x_in)
            raw = unet(x_in, t_in, *args, **kwargs, state=state)
        calls += 1
        out, delta = raw.to(x.dtype), None
        if both:
            out, delta = guided_sum(out, rows, scale)
        elif guided and plan.guidance == "reuse":   # eps_c + (w - 1)·Δ, the last Δ
            out = out + (scale - 1) * state.delta
        if prediction == "v":
            out = a ** 0.5 * out + (1 - a) ** 0.5 * x
        if state is not None:
            state.end_call(raw, out, delta)
        return out

    x_T = x_T.to(torch.promote_types(x_T.dtype, torch.float32))   # latents stay in (at least) fp32
    generator = (torch.Generator().manual_seed(stream_seed(seed, sampler.stream)) if sampler.stream
                 else None)
    for i, t, x, pred_x0 in sampler.run(model, x_T, ts, levels, eta, generator):
        stops = (state.stopped_at.tolist()
                 if state is not None and state.stopped_at is not None else None)
        yield Step(i, steps, t, x, pred_x0, calls, stops)


def guided_sum(out, rows, scale):
    """Classifier-free guidance on a batch [uncond of `rows`; cond of all] (rows None: all images)
    -> (eps_u + w·(eps_c - eps_u), Δ = eps_c - eps_u); an image outside `rows` takes eps_c, Δ 0."""
    if rows is None:
        e_uncond, e_cond = out.chunk(2)
        delta = e_cond - e_uncond
        return e_uncond + scale * delta, delta
    e_uncond, e_cond = out[:len(rows)], out[len(rows):]
    delta = torch.zeros_like(e_cond)
    delta[rows] = e_cond[rows] - e_uncond
    return e_cond + (scale - 1) * delta, delta   # the guided sum where Δ is not 0


def picked(c, rows):
    """The conditioning of the images `rows`: a context, or a dict of them (SDXL's context, y)."""
    return c[rows] if torch.is_tensor(c) else {k: v[rows] for k, v in c.items()}


def joined(uncond, cond):
    """The guided batch's conditioning [uncond; cond]: contexts or dicts (SDXL's context and y)."""
    if torch.is_tensor(cond):
        return torch.cat([uncond, cond])
    return {k: torch.cat([uncond[k], cond[k]]) for k in cond}


def final_step(steps):
    """Run a sample_steps loop (bare or wrapped, e.g. in a progress bar) to its end -> last Step."""
    return deque(steps, maxlen=1)[0]


def final_latent(steps):
    """Run a sample_steps loop to its end -> the last latent."""
    return final_step(steps).x


def sample(unet, x_T, cond, uncond=None, steps=50, scale=7.5, method="plms", eta=0.0,
           prediction="eps", accel=None, seed=0):
    """Run the whole loop and return the final latent [B, c, h, w] (fp32, or fp64 for an fp64 x_T).
    Arguments as for sample_steps."""
    return final_latent(sample_steps(unet, x_T, cond, uncond, steps, scale, method, eta, prediction,
                                     accel, seed))


def check_args(steps=50, scale=7.5, method="plms", eta=0.0, prediction="eps"):
    """Raise SettingError, naming the argument, for settings no sampler can run (before heavy
    work starts)."""
    sampler = find_sampler(method)
    check_steps(steps)
    for name, value in (("scale", scale), ("eta", eta)):
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value)):
            raise SettingError(name, f"must be a finite number, got {value!r}")
    if not sampler.takes_eta and eta != 0:
        raise SettingError("eta", f"must be 0 (got {eta}): sampler {method} takes no eta; "
                           "only ddim does")
    if eta < 0:
        raise SettingError("eta", f"must be >= 0, got {eta}")
    if prediction not in PREDICTIONS:
        raise SettingError("prediction", f"must be 'eps' or 'v', got {prediction!r}")
    if not 0 <= scale <= MAX_SCALE:
        raise SettingError("scale", f"(guidance) must be between 0 and {MAX_SCALE}, got {scale} "
                           "(typical: 5 to 10; far beyond, the guided prediction burns the image "
                           "out and overflows)")
