"""One plan per UNet call: guidance per call (window, one branch, a reused difference), skipped calls,
forecast features and given timesteps, each against its definition computed by hand here."""
import json
import math

import diffusers.schedulers.scheduling_utils as diffusers_schedules
import pytest
import torch

from accel import PRESETS, Acceleration, Gate, Guidance, Skip, find_preset
from accel.presets import AYS_SD15_10
from cache import FULL, CacheSchedule
from conftest import tiny_unet
from model.macs import unet_macs
from model.unet import BasicTransformerBlock
from prune import token_method
from sampler import CallPlan, call_sigmas, run_schedule, sample, sample_steps
from sampler.ddim import ddim_steps
from sampler.dpmpp import dpmpp_2m_steps
from sampler.schedule import alphas_cumprod, ddim_update
from tools.measure import kind_macs, run_macs
from tools.specs import schedule_entry

SCALE = 7.5


class Branches:
    """A UNet stand-in whose two branches differ and whose calls are recorded: (rows, timestep) per call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, state=None):
        self.calls.append((x.shape[0], int(t[0])))
        return torch.tanh(0.3 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000)


def contexts(rows=2):
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(rows, 77, 8, generator=g), torch.randn(rows, 77, 8, generator=g)
    return cond, uncond


def latent(rows=2):
    return torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def branches(unet, x, t, cond, uncond):
    t_in = torch.full((x.shape[0],), t)
    return unet(x, t_in, cond), unet(x, t_in, uncond)


def test_one_branch_calls_equal_an_unguided_run_bit_for_bit():
    """A window that holds no call: every call is the conditional prediction alone, at batch 1 per image,
    exactly what a run without guidance computes."""
    cond, uncond = contexts()
    unet = Branches()
    outside = sample(unet, latent(), cond, uncond, steps=6, scale=SCALE, method="dpmpp-2m",
                     accel=Acceleration(guidance=Guidance(window=(100.0, 200.0))))
    assert all(rows == 2 for rows, _ in unet.calls)
    assert torch.equal(outside, sample(Branches(), latent(), cond, None, steps=6, scale=SCALE, method="dpmpp-2m"))


def test_guidance_window_guides_the_calls_inside_it():
    sigmas = call_sigmas("dpmpp-2m", 10)
    modes = Guidance(window=(1.0, 6.0), outside="reuse").modes_for(10, sigmas)
    assert modes == ["both" if 1.0 < s <= 6.0 else "reuse" for s in sigmas]
    assert modes[:2] == ["reuse", "reuse"] and modes[2] == "both" and modes[-1] == "reuse"
    cond, uncond = contexts()
    unet = Branches()
    sample(unet, latent(), cond, uncond, steps=10, scale=SCALE, method="dpmpp-2m",
           accel=Acceleration(guidance=Guidance(window=(1.0, 6.0))))
    assert [rows for rows, _ in unet.calls] == [4 if m == "both" else 2 for m in modes]


def test_reused_difference_and_one_branch_by_hand():
    """DDIM, 3 steps, modes (both, reuse, cond): eps_0 = e_u + w (e_c - e_u); eps_1 = e_c + (w - 1) Δ_0;
    eps_2 = e_c."""
    cond, uncond = contexts()
    x0, unet = latent(), Branches()
    got = sample(unet, x0, cond, uncond, steps=3, scale=SCALE, method="ddim",
                 accel=Acceleration(guidance=Guidance(modes=("both", "reuse", "cond"))))
    ts, levels = run_schedule("ddim", 3)
    x, delta = x0, None
    for i, t in enumerate(ts):
        e_c, e_u = branches(Branches(), x, t, cond, uncond)
        if i == 0:
            eps, delta = e_u + SCALE * (e_c - e_u), e_c - e_u
        else:
            eps = e_c + (SCALE - 1) * delta if i == 1 else e_c
        x, _ = ddim_update(x, eps, levels[i], levels[i + 1])
    assert torch.allclose(got, x, rtol=1e-6, atol=1e-6)
    assert [rows for rows, _ in unet.calls] == [4, 2, 2]


def test_skipped_call_extrapolates_and_the_solver_keeps_its_history():
    """DPM++(2M), 5 steps, call 3 skipped: the UNet is called 4 times, and the result is the solver run on
    the estimates e_0, e_1, e_2, 2 e_2 - e_1, e_4 (x0 recomputed from the latent of step 3)."""
    cond, uncond = contexts()
    x0, unet = latent(), Branches()
    got = sample(unet, x0, cond, uncond, steps=5, scale=SCALE, method="dpmpp-2m", accel=Acceleration(skip=Skip((3,))))
    assert len(unet.calls) == 4
    estimates = []

    def model(x, t, a):
        if len(estimates) == 3:
            estimates.append(2 * estimates[2] - estimates[1])
        else:
            e_c, e_u = branches(Branches(), x, t, cond, uncond)
            estimates.append(e_u + SCALE * (e_c - e_u))
        return estimates[-1]
    ts, sigmas = run_schedule("dpmpp-2m", 5)
    *_, (_, _, expected, _) = dpmpp_2m_steps(model, x0, ts, sigmas)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_forecast_is_the_lagrange_extrapolation_in_log_snr():
    """Order 1 and 2 on a tiny UNet: a cached call's entry feature is the line / parabola in λ = -log σ through
    the last full calls' features."""
    unet = tiny_unet()
    x, context = torch.randn(2, 4, 16, 12), torch.randn(2, 77, unet.config.context_dim)
    sigmas = [8.0, 4.0, 2.0, 1.0]
    for order in (1, 2):
        accel = Acceleration(cache=CacheSchedule("dato", depths=(FULL, FULL, FULL, 1), order=order))
        state, seen = accel.start(4, 0, sigmas=sigmas), []
        for i in range(3):
            state.begin_call(i, x)
            unet(x + i, torch.full((2,), 900 - 100 * i), context, state=state)
            seen.append(state.features[10])   # output block 10 is what depth 1 starts from
        state.begin_call(3, x)
        lam = [-math.log(s) for s in sigmas]
        if order == 1:
            want = seen[2] + (seen[2] - seen[1]) * (lam[3] - lam[2]) / (lam[2] - lam[1])
        else:
            want = sum(seen[j] * math.prod((lam[3] - lam[k]) / (lam[j] - lam[k]) for k in range(3) if k != j)
                       for j in range(3))
        assert torch.allclose(state.features[10], want, rtol=1e-5, atol=1e-5)


def test_forecast_order_0_is_todays_reuse():
    unet = tiny_unet()
    x, context = torch.randn(2, 4, 16, 12), torch.randn(2, 77, unet.config.context_dim)
    plain = Acceleration(cache=CacheSchedule("uniform", interval=2, depth=1))
    outs = [sample(unet, x, context, None, steps=4, scale=1, method="dpmpp-2m", accel=a)
            for a in (plain, Acceleration(cache=CacheSchedule("uniform", interval=2, depth=1, order=0)))]
    assert torch.equal(*outs)


def test_macs_count_one_branch_as_half_and_a_skip_as_nothing():
    unet = tiny_unet()
    base = run_macs(unet, None, 6, (16, 12))
    assert run_macs(unet, Acceleration(guidance=Guidance(modes=("cond",) * 6)), 6, (16, 12)) == base / 2
    assert run_macs(unet, Acceleration(skip=Skip((2, 4))), 6, (16, 12)) == pytest.approx(base * 4 / 6)
    mixed = Acceleration(guidance=Guidance(modes=("both", "both", "reuse", "cond", "both", "reuse")), skip=Skip((3,)))
    assert run_macs(unet, mixed, 6, (16, 12)) == pytest.approx(base * (3 + 0.5 + 0.5) / 6)


@pytest.mark.parametrize("accel,match", [
    (Acceleration(guidance=Guidance(modes=("reuse", "both"))), "no guided call is made before it"),
    (Acceleration(guidance=Guidance(modes=("both", "reuse")), skip=None,
                  cache=CacheSchedule("dato", depths=(FULL, FULL))), None),
    (Acceleration(guidance=Guidance(modes=("cond", "both")), cache=CacheSchedule("dato", depths=(FULL, 1))),
     "no unconditional half"),
])
def test_plans_no_run_can_follow_are_refused(accel, match):
    if match is None:
        accel.check(2)
    else:
        with pytest.raises(ValueError, match=match):
            accel.check(2)


def test_one_branch_cached_call_after_a_guided_full_call_takes_the_conditional_half():
    """Guided full call, then a conditional-only cached call: it starts from the conditional half of the
    guided call's features, which equal a conditional-only full call's on the same inputs."""
    unet = tiny_unet()
    x, context = torch.randn(1, 4, 16, 12), torch.randn(2, 77, unet.config.context_dim)
    t = torch.full((2,), 500)
    accel = Acceleration(cache=CacheSchedule("dato", depths=(FULL, 2)), guidance=Guidance(modes=("both", "cond")))
    state = accel.start(2, 0, guided=True)
    state.begin_call(0, torch.cat([x, x]))
    unet(torch.cat([x, x]), t, context, state=state)
    state.begin_call(1, x)
    cached = unet(x, t[:1], context[1:], state=state)
    assert torch.allclose(cached, unet(x, t[:1], context[1:]), rtol=1e-5, atol=1e-5)


def test_given_timesteps_are_the_ones_called():
    cond, uncond = contexts()
    unet = Branches()
    sample(unet, latent(), cond, uncond, steps=10, method="dpmpp-2m", accel=PRESETS["ays-10"].acceleration())
    assert [t for _, t in unet.calls] == list(AYS_SD15_10)
    assert list(AYS_SD15_10) == diffusers_schedules.AysSchedules["StableDiffusionTimesteps"]
    default, _ = run_schedule("dpmpp-2m", 10)   # the sampler's own timesteps, given: the same run bit for bit
    runs = [sample(Branches(), latent(), cond, uncond, steps=10, method="dpmpp-2m", accel=a)
            for a in (None, Acceleration(timesteps=tuple(default)))]
    assert torch.equal(*runs)
    ts, levels = run_schedule("plms", 3, timesteps=(900, 500, 100))
    alphas = alphas_cumprod()
    assert ts == [900, 500, 100] and levels == [alphas[t].item() for t in (900, 500, 100, 0)]


@pytest.mark.parametrize("timesteps,match", [((999, 500), "2 timesteps for a run of 3 steps"),
                                             ((500, 600, 100), "strictly down"), ((1000, 500, 1), "strictly down")])
def test_bad_timesteps(timesteps, match):
    with pytest.raises(ValueError, match=match):
        run_schedule("ddim", 3, timesteps=timesteps)


def test_ddim_on_given_timesteps_by_hand():
    x0, ts = latent(), (800, 400, 50)
    unet = Branches()
    got = sample(unet, x0, contexts()[0], None, steps=3, scale=1, method="ddim", accel=Acceleration(timesteps=ts))
    alphas = alphas_cumprod()
    x = x0
    for i, t in enumerate(ts):
        a_prev = alphas[ts[i + 1]].item() if i + 1 < len(ts) else alphas[0].item()
        x, _ = ddim_update(x, Branches()(x, torch.full((2,), t), contexts()[0]), alphas[t].item(), a_prev)
    assert torch.allclose(got, x, rtol=1e-6, atol=1e-6)
    assert next(ddim_steps(lambda x, t, a: x, x0, list(ts), [alphas[t].item() for t in ts] + [alphas[0].item()]))


def test_schedule_file_carries_the_plan(tmp_path):
    accel = Acceleration(token_method("dato", ratio=0.5), CacheSchedule("dato", depths=(FULL, 1, FULL, 0, 1, FULL),
                                                                        order=1),
                         guidance=Guidance(modes=("both", "both", "reuse", "reuse", "cond", "cond")),
                         skip=Skip((3,)), timesteps=(999, 800, 600, 400, 200, 50))
    path = tmp_path / "plan.json"
    path.write_text(__import__("json").dumps(schedule_entry(accel, "dpmpp-2m", 6)))
    loaded = find_preset(str(path)).acceleration()
    sigmas = call_sigmas("dpmpp-2m", 6, accel.timesteps)
    assert loaded.plans(6, sigmas) == accel.plans(6, sigmas) and loaded.timesteps == accel.timesteps
    assert loaded.cache.order == 1


def test_batches_change_size_across_a_run_with_forecasts():
    """One-branch and guided calls interleaved with cached, forecast calls: each cached call gets features of its
    own batch (a guided full call after one-branch ones, then cached calls of both kinds)."""
    unet = tiny_unet()
    x, g = torch.randn(1, 4, 16, 12), torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(1, 77, unet.config.context_dim, generator=g) for _ in range(2))
    accel = Acceleration(cache=CacheSchedule("dato", depths=(FULL, FULL, FULL, 1, FULL, 2, 1), order=2),
                         guidance=Guidance(modes=("cond", "both", "both", "both", "cond", "cond", "reuse")))
    out = sample(unet, x, cond, uncond, steps=7, method="ddim", accel=accel)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_gate_reads_the_branch_mean_of_each_cross_attention_by_hand():
    """T-GATE on a tiny UNet, DDIM 4 steps, gate 2: calls 0 and 1 guided as SD; call 1 keeps each cross-attention's
    output, (out_u + out_c) / 2; calls 2 and 3 run the conditional branch with every cross-attention's output
    replaced by the kept one (done here with forward hooks on the plain UNet)."""
    unet = tiny_unet()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 16, 12, generator=g)
    cond, uncond = (torch.randn(2, 77, unet.config.context_dim, generator=g) for _ in range(2))
    got = sample(unet, x0, cond, uncond, steps=4, scale=SCALE, method="ddim", accel=Acceleration(gate=Gate(2)))
    layers = {m.name: m.attn2 for m in unet.modules() if isinstance(m, BasicTransformerBlock)}
    seen, kept, hooks = {}, {}, []
    ts, levels = run_schedule("ddim", 4)
    x = x0
    for i, t in enumerate(ts):
        if i == 1:
            hooks = [layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out))
                     for name, layer in layers.items()]
        if i < 2:
            e_u, e_c = unet(torch.cat([x, x]), torch.full((4,), t), torch.cat([uncond, cond])).chunk(2)
            eps = e_u + SCALE * (e_c - e_u)
        else:
            eps = unet(x, torch.full((2,), t), cond)
        if i == 1:
            for h in hooks:
                h.remove()
            kept.update({name: sum(out.chunk(2)) / 2 for name, out in seen.items()})
            hooks = [layer.register_forward_hook(lambda m, args, out, name=name: kept[name])
                     for name, layer in layers.items()]
        x, _ = ddim_update(x, eps, levels[i], levels[i + 1])
    for h in hooks:
        h.remove()
    assert len(kept) == len(layers) > 0
    assert torch.allclose(got, x, rtol=1e-5, atol=1e-5)


def test_gated_call_costs_half_a_call_without_its_cross_attention():
    """A call past the gate: the conditional branch, and none of the cross-attention's projections (the queries,
    the context's keys and values, the output) nor its matmuls, counted here from the layers' shapes."""
    unet, hw = tiny_unet(), (16, 12)
    full = sum(unet_macs(unet, hw, matmuls=True).values())
    cross = 0
    for st in unet.modules():
        if hasattr(st, "transformer_blocks"):
            n = math.ceil(hw[0] / 2 ** st.downsamples) * math.ceil(hw[1] / 2 ** st.downsamples)
            for block in st.transformer_blocks:
                a = block.attn2
                cross += n * (a.to_q.in_features + a.to_out[0].out_features) * a.to_q.out_features
                cross += 77 * (a.to_k.in_features * a.to_k.out_features + a.to_v.in_features * a.to_v.out_features)
                cross += 2 * n * 77 * a.to_q.out_features
    gated = CallPlan(guidance="cond", cross="cached")
    assert kind_macs(unet, Acceleration(gate=Gate(1)), gated, hw, matmuls=True) == (full - cross) / 2
    assert run_macs(unet, Acceleration(gate=Gate(2)), 4, hw, matmuls=True) == 2 * full + (full - cross)


@pytest.mark.parametrize("accel,match", [
    (Acceleration(gate=Gate(2), guidance=Guidance(modes=("both", "both", "both", "cond"))), "guidance must be cond"),
    (Acceleration(gate=Gate(2), guidance=Guidance(modes=("both", "cond", "cond", "cond"))), "must be made, full and"),
    (Acceleration(gate=Gate(2), cache=CacheSchedule("dato", depths=(FULL, 2, FULL, 2))), "must be made, full and"),
    (Acceleration(gate=Gate(4)), "not a UNet call of this run"),
])
def test_gates_no_run_can_follow_are_refused(accel, match):
    with pytest.raises(ValueError, match=match):
        accel.check(4)


def test_gate_in_a_schedule_file(tmp_path):
    accel = Acceleration(gate=Gate(4), guidance=Guidance(window=(3.0, 15.0)))
    path = tmp_path / "gate.json"
    path.write_text(json.dumps(schedule_entry(accel, "dpmpp-2m", 10)))
    preset = find_preset(str(path))
    assert preset.gate == Gate(4) and preset.acceleration().plans(10, call_sigmas("dpmpp-2m", 10)) == \
        accel.plans(10, call_sigmas("dpmpp-2m", 10))


def test_adaptive_guidance_stops_each_image_by_hand():
    """Guidance stop 0.99 on DDIM, 6 steps, two images whose branches agree at different calls: each image is
    its own hand-made run (batch 1) guided until, after a call, cos(e_c, e_u) over the image exceeds 0.99, then
    conditional alone; the batched run equals both, its guided batches shrinking as the images stop."""
    cond, uncond = contexts()
    uncond[0], uncond[1] = cond[0] + 0.05, cond[1] + 3.0
    x0, unet = latent(), Branches()
    got = sample(unet, x0, cond, uncond, steps=6, scale=SCALE, method="ddim",
                 accel=Acceleration(guidance=Guidance(stop=0.99)))
    ts, levels = run_schedule("ddim", 6)
    stops = []
    for k in range(2):
        x, stopped = x0[k:k + 1], None
        for i, t in enumerate(ts):
            e_c, e_u = branches(Branches(), x, t, cond[k:k + 1], uncond[k:k + 1])
            eps = e_c if stopped is not None else e_u + SCALE * (e_c - e_u)
            if stopped is None and torch.nn.functional.cosine_similarity(e_c.flatten(), e_u.flatten(), dim=0) > 0.99:
                stopped = i + 1
            x, _ = ddim_update(x, eps, levels[i], levels[i + 1])
        stops.append(stopped)
        assert torch.allclose(got[k:k + 1], x, rtol=1e-6, atol=1e-6)
    assert stops == [1, 2]
    assert [rows for rows, _ in unet.calls] == [4, 3, 2, 2, 2, 2]


def test_adaptive_guidance_reuses_no_difference_after_a_stop_and_counts_what_ran():
    """A stopped image's Δ is 0, so a reuse call gives it the conditional prediction; MACs per image count its
    guided calls from its stop on as one branch; the PNG-bound Step records each image's stop."""
    cond, uncond = contexts()
    uncond[0], uncond[1] = cond[0] + 0.05, cond[1] + 3.0
    accel = Acceleration(guidance=Guidance(modes=("both", "both", "reuse", "reuse"), stop=0.99))
    steps = list(sample_steps(Branches(), latent(), cond, uncond, steps=4, scale=SCALE, method="ddim", accel=accel))
    assert steps[-1].stops == [1, 2]
    alone = sample(Branches(), latent()[:1], cond[:1], uncond[:1], steps=4, scale=SCALE, method="ddim",
                   accel=Acceleration(guidance=Guidance(modes=("both", "cond", "cond", "cond"))))
    assert torch.allclose(steps[-1].x[:1], alone, rtol=1e-6, atol=1e-6)
    unet = tiny_unet()
    full = run_macs(unet, None, 1, (16, 12))
    assert run_macs(unet, accel, 4, (16, 12), stopped_at=1) == pytest.approx(full * 2.5)
    assert run_macs(unet, accel, 4, (16, 12), stopped_at=-1) == pytest.approx(full * 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(guidance=Guidance(stop=0.99), cache=CacheSchedule("uniform", interval=2, depth=1)), "cannot be combined"),
    (dict(guidance=Guidance(stop=0.99), gate=Gate(2)), "cannot be combined"),
])
def test_adaptive_guidance_refuses_what_needs_the_whole_batch(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Acceleration(**kwargs)


@pytest.mark.parametrize("stop", [1.0, -0.1, True, "0.9"])
def test_bad_guidance_stop(stop):
    with pytest.raises(ValueError, match="cosine similarity in"):
        Guidance(stop=stop)


def test_guidance_stop_in_a_schedule_file(tmp_path):
    accel = Acceleration(guidance=Guidance(window=(1.0, 15.0), stop=0.995))
    path = tmp_path / "stop.json"
    path.write_text(json.dumps(schedule_entry(accel, "dpmpp-2m", 10)))
    guidance = find_preset(str(path)).guidance
    sigmas = call_sigmas("dpmpp-2m", 10)
    assert guidance.stop == 0.995 and guidance.modes_for(10) == accel.guidance.modes_for(10, sigmas)
