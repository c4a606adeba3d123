"""Sampler math against analytic cases and hand-computed recurrences.

For Gaussian data x0 ~ N(μ, σ²) the optimal noise predictor is known in closed form,
    eps*(x_t, t) = √(1-ᾱ_t) (x_t - √ᾱ_t μ) / (ᾱ_t σ² + 1 - ᾱ_t),
and the probability-flow ODE maps each marginal N(√ᾱ μ, ᾱσ² + 1 - ᾱ) onto the next by keeping
the standardised value, so the exact deterministic solution from x_T is known too.
"""
import pytest
import torch

from accel import AcceleratedRun, Acceleration
from sampler import check_args, sample, sample_steps, stream_seed, unet_calls
from sampler.schedule import alphas_cumprod
from sampler.schedule import ldm_timesteps as timesteps

ALPHAS = alphas_cumprod()
MU, SIGMA = 0.7, 0.4


def gaussian_eps(x, t, context=None):
    a = ALPHAS[t].to(x.dtype).view(-1, 1, 1, 1)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SIGMA ** 2 + 1 - a)


def exact_solution(x_T, steps):
    a_T, a_0 = ALPHAS[timesteps(steps)[-1]].item(), ALPHAS[0].item()
    z = (x_T - a_T ** 0.5 * MU) / (a_T * SIGMA ** 2 + 1 - a_T) ** 0.5
    return a_0 ** 0.5 * MU + (a_0 * SIGMA ** 2 + 1 - a_0) ** 0.5 * z


def x_T(seed=0):
    return torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(unet, x, **kw):
    return sample(unet, x, torch.zeros(x.shape[0], 77, 8, dtype=x.dtype), **kw)


def test_schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(ALPHAS, torch.cumprod(1 - betas, 0))
    assert timesteps(50) == [1 + 20 * i for i in range(50)] and timesteps(50)[-1] == 981
    for steps in (1, 3, 10, 20, 25, 50, 100, 250, 500):   # where LDM is defined, the same as LDM
        ldm = [t + 1 for t in range(0, 1000, 1000 // steps)]
        assert timesteps(steps) == (ldm if 1000 % steps == 0 else ldm[:steps])
    assert timesteps(3) == [1, 334, 667] and timesteps(30)[-1] == 958 and timesteps(999)[-1] == 999
    assert unet_calls(50, "plms") == 51 and unet_calls(50, "ddim") == 50


def error(method, steps):
    x = x_T()
    return (run(gaussian_eps, x, steps=steps, method=method) - exact_solution(x, steps)).abs().max().item()


@pytest.mark.parametrize("method,steps,tol", [("ddim", 500, 0.012), ("plms", 50, 0.008), ("plms", 100, 0.001)])
def test_reproduces_probability_flow(method, steps, tol):
    """Max error over 1024 values of unit scale (|x_T| up to about 3.5)."""
    assert error(method, steps) < tol


def test_convergence_orders():
    """DDIM is first order (halving the step halves the error); PLMS is higher order."""
    assert 1.7 < error("ddim", 50) / error("ddim", 100) < 2.3
    assert error("plms", 25) / error("plms", 50) > 3
    assert error("plms", 25) < error("ddim", 25) / 5


def test_plms_calls_and_coefficients():
    """A model that returns c_k on its k-th call (whatever the input) exposes the multistep
    coefficients: each step's effective eps' can be read back from the update."""
    c = torch.tensor([0.3, -1.1, 0.8, 2.0, -0.4, 1.5, 0.9], dtype=torch.float64)
    seen = []

    def unet(x, t, context):
        seen.append(int(t[0]))
        return torch.full_like(x, c[len(seen) - 1].item() if len(seen) <= len(c) else 0.0)

    steps = list(sample_steps(unet, x_T()[:1], torch.zeros(1, 77, 8), steps=50))
    assert len(steps) == 50 and steps[-1].calls == 51
    ts = timesteps(50)[::-1]
    assert seen == [981, 961, 961] + ts[2:]   # the Euler corrector evaluates the next timestep

    x, expected = x_T()[:1], [(c[0] + c[1]) / 2, (3 * c[2] - c[0]) / 2, (23 * c[3] - 16 * c[2] + 5 * c[0]) / 12,
                              (55 * c[4] - 59 * c[3] + 37 * c[2] - 9 * c[0]) / 24,
                              (55 * c[5] - 59 * c[4] + 37 * c[3] - 9 * c[2]) / 24]
    for i, want in enumerate(expected):
        a_t, a_prev = ALPHAS[ts[i]].item(), ALPHAS[ts[i + 1]].item()
        x_prev = steps[i].x
        k = (a_prev / a_t) ** 0.5
        eps_prime = (x_prev - k * x) / ((1 - a_prev) ** 0.5 - k * (1 - a_t) ** 0.5)
        torch.testing.assert_close(eps_prime, torch.full_like(x, want.item()))
        x = x_prev


def test_last_step_goes_to_alpha_0():
    """One DDIM step from t=1 with a constant eps lands on ᾱ[0] (LDM), not on ᾱ=1."""
    x = x_T()[:1]
    out = run(lambda x, t, c: torch.full_like(x, 0.5), x, steps=1, method="ddim")
    a_t, a_0 = ALPHAS[1].item(), ALPHAS[0].item()
    torch.testing.assert_close(out, a_0 ** 0.5 * (x - (1 - a_t) ** 0.5 * 0.5) / a_t ** 0.5 + (1 - a_0) ** 0.5 * 0.5)


@pytest.mark.parametrize("method", ["plms", "ddim"])
def test_v_prediction_matches_eps(method):
    def v_model(x, t, context):   # v = (eps - √(1-ᾱ) x) / √ᾱ for the same predictor
        a = ALPHAS[t].to(x.dtype).view(-1, 1, 1, 1)
        return (gaussian_eps(x, t) - (1 - a).sqrt() * x) / a.sqrt()

    x = x_T()
    torch.testing.assert_close(run(v_model, x, method=method, prediction="v"), run(gaussian_eps, x, method=method))


def test_cfg_order_and_combination():
    """One call on [x; x] with contexts [uncond; cond]; eps = e_u + s (e_c - e_u)."""
    cond, uncond = torch.full((2, 77, 8), 2.0), torch.full((2, 77, 8), -1.0)
    calls = []

    def unet(x, t, context):   # eps = the context's mean: e_u = -1, e_c = 2
        calls.append(context)
        return torch.ones_like(x) * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    x = x_T()[:2].float()
    out = sample(unet, x, cond, uncond, steps=1, scale=7.5, method="ddim")
    assert torch.equal(calls[0], torch.cat([uncond, cond]))
    eps = -1 + 7.5 * (2 - -1)
    a_t, a_0 = ALPHAS[1].item(), ALPHAS[0].item()
    torch.testing.assert_close(out, a_0 ** 0.5 * (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5 + (1 - a_0) ** 0.5 * eps)


def test_scale_1_is_the_conditional_prediction():
    cond, uncond = torch.randn(2, 77, 8), torch.randn(2, 77, 8)
    batches = []

    def unet(x, t, context):
        batches.append(x.shape[0])
        return gaussian_eps(x, t) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    x = x_T()[:2].float()
    guided = sample(unet, x, cond, uncond, scale=1.0, steps=10)
    assert set(batches) == {2}   # no unconditional half at scale 1
    torch.testing.assert_close(guided, sample(unet, x, cond, None, steps=10))


def test_ddim_eta_is_seeded():
    x = x_T().float()
    a, b, c = (run(gaussian_eps, x, steps=10, method="ddim", eta=1.0, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, run(gaussian_eps, x, steps=10, method="ddim"))


def test_random_streams_are_not_the_x_T_stream():
    """x_T is drawn from the seed itself; DDIM's noise and the token choices must not replay it."""
    seeds = [stream_seed(s, name) for s in (0, 1, 2) for name in ("ddim", "accel")]
    assert len(set(seeds)) == 6 and not set(seeds) & set(range(1000))
    assert stream_seed(7, "ddim") == stream_seed(7, "ddim")


def test_run_state_sees_every_call():
    """The per-run state is told each call index and receives each raw (unguided) output."""
    seen, outputs = [], []

    class Watch(AcceleratedRun):
        def begin_call(self, index, x):
            seen.append(index)
            super().begin_call(index, x)

        def end_call(self, output, estimate=None, delta=None):
            outputs.append(output)
            super().end_call(output, estimate, delta)

    class Watched(Acceleration):
        def start(self, calls, seed, guided=False, sigmas=None):
            assert calls == 51 and guided and len(sigmas) == 51
            return Watch(self, calls, seed, guided, sigmas)

    def unet(x, t, context, state=None):
        assert isinstance(state, Watch)
        return gaussian_eps(x, t)

    sample(unet, x_T()[:1].float(), torch.zeros(1, 77, 8), torch.zeros(1, 77, 8), accel=Watched())
    assert seen == list(range(51)) and all(o.shape[0] == 2 for o in outputs)


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "steps"), (dict(steps=1000), "steps"), (dict(method="heun"), "unknown sampler"),
    (dict(method="euler-a", eta=1.0), "euler-a takes no eta"),
    (dict(eta=0.5), "plms takes no eta"),
    (dict(method="dpmpp-2m", eta=0.5), "dpmpp-2m takes no eta"), (dict(method="ddim", eta=-1), "eta"),
    (dict(prediction="x0"), "prediction"), (dict(scale=-2), "scale")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        check_args(**kw)


def test_one_conditioning_per_latent():
    unet = lambda x, t, c: torch.zeros_like(x)   # noqa: E731
    with pytest.raises(ValueError, match="cond holds 1 conditionings for 2 latents"):
        sample(unet, torch.zeros(2, 4, 8, 8), torch.zeros(1, 77, 8), torch.zeros(2, 77, 8), steps=2)
    with pytest.raises(ValueError, match="uncond holds 3 conditionings for 2 latents"):
        sample(unet, torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 8), torch.zeros(3, 77, 8), steps=2)
