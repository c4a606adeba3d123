"""How bench.py measures one UNet call: the call as it happens inside an accelerated run, the calls timed
interleaved, the memory a call needs, the UNet alone with random weights, and diffusers' UNet of the same
architecture sharing its weights (for the side-by-side timing and an output check), and the official SiTo/DaTo
token selection (bench.py --selection times ours against it); the analytic MACs of a call and a run
(evaluate.py and search.py count them too) and the CPU they ran on."""
import ctypes
import os
import platform
import re
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from accel import Acceleration, Gate, Guidance
from cache import FULL, CacheSchedule
from model.hardware import native_bf16_cpu, timed
from model.macs import unet_macs
from model.unet import UNetModel
from sampler import PLAIN


class CallKind(NamedTuple):
    """What makes one UNet call cost what it does: bench.py times each kind of a run once."""
    prune: object    # the token method's settings at the call's ratio, or None
    depth: int       # its cache depth (FULL: the whole UNet)
    guided: bool     # both branches, or the conditional one
    gated: bool      # its cross-attention read from the kept one (T-GATE)


def kind_settings(accel, plan):
    """The CallKind of a call made as `plan` (a CallPlan), None for a skipped call (nothing to time)."""
    if plan.skip:
        return None
    prune = accel.prune.every_call(plan.ratio) if plan.ratio else None
    return CallKind(prune, plan.depth, plan.guidance == "both", plan.cross == "cached")


def kind_name(plan):
    """'full @ 0', 'depth 2 @ 0.4', 'full @ 0 cond', 'full @ 0 cond gated', 'skipped': a call kind of
    bench.py's table."""
    if plan.skip:
        return "skipped"
    name = f"{'full' if plan.depth == FULL else f'depth {plan.depth}'} @ {plan.ratio:g}"
    name = name if plan.guidance == "both" else f"{name} {plan.guidance}"
    return f"{name} gated" if plan.cross == "cached" else name


def kind_call(unet, settings, x, t, cond):
    """A function making one UNet call with these settings, as it happens inside a run: the second call
    of a run whose first, full and guided, filled the cache and kept the cross-attention (T-GATE), with
    two earlier outputs for DaTo's dynamics map; a one-branch call on the conditional half of the guided
    batch x. cond: the UNet's keyword inputs (context, and y for SDXL)."""
    prune, depth, guided, gated = settings
    half = 0 if guided else x.shape[0] // 2
    x_call, t_call, cond_call = x[half:], t[half:], {k: v[half:] for k, v in cond.items()}
    if prune is None and depth == FULL and not gated:
        return lambda: unet(x_call, t_call, **cond_call)
    cache = CacheSchedule("dato", depths=(FULL, depth)) if depth != FULL else None
    modes = ("both", "both" if guided else "cond")
    state = Acceleration(prune, cache, guidance=Guidance(modes=modes), gate=Gate(1) if gated else None).start(
        2, 0, guided=True)
    state.begin_call(0, x)
    unet(x, t, **cond, state=state)
    for _ in range(2):
        state.end_call(torch.randn_like(x_call))

    def call():
        state.begin_call(1, x_call)
        return unet(x_call, t_call, **cond_call, state=state)
    return call


def compare(calls, runs, warmup, device):
    """{name: fn} -> {name: [seconds per run]}, the calls interleaved run by run."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            times[name].append(timed(fn, device)[1])
    return times


def kb(key, path="/proc/self/status"):
    """A `key: N kB` figure of a Linux /proc file, in bytes."""
    return int(re.search(rf"{key}:\s+(\d+) kB", open(path).read())[1]) * 1024


def peak_memory(fn, device):
    """Bytes the call needs above what is allocated when it starts (None where not measurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:   # Linux: return freed heap to the system, reset the resident-set high-water mark, call, read it
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = kb("VmRSS")
        fn()
        return kb("VmHWM") - before
    except (OSError, AttributeError):   # not Linux / not glibc
        return None


def random_unet(config, device, dtype, seed=0):
    """The UNet of an SDConfig alone, with random weights: speed does not depend on their values, and SDXL's
    whole model (text encoders included) beside diffusers' UNet would not fit a 24 GB machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetModel(config.unet)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False).channels_last()


def diffusers_config(config):
    """diffusers' UNet2DConditionModel settings (its unet/config.json) for the UNet of an SDConfig."""
    u, levels = config.unet, len(config.unet.channel_mult)
    heads = [u.model_channels * m // u.head_channels if u.head_channels else u.num_heads for m in u.channel_mult]
    settings = dict(in_channels=u.in_channels, out_channels=u.out_channels, layers_per_block=u.num_res_blocks,
                    block_out_channels=[u.model_channels * m for m in u.channel_mult],
                    down_block_types=["CrossAttnDownBlock2D" if u.transformer_depth_at(i) else "DownBlock2D"
                                      for i in range(levels)],
                    up_block_types=["CrossAttnUpBlock2D" if u.transformer_depth_at(i) else "UpBlock2D"
                                    for i in reversed(range(levels))],
                    transformer_layers_per_block=[max(u.transformer_depth_at(i), 1) for i in range(levels)],
                    attention_head_dim=heads, cross_attention_dim=u.context_dim, use_linear_projection=u.linear_proj,
                    upcast_attention=u.upcast_attention)
    if u.adm_in_channels:   # SDXL: diffusers embeds the size/crop ids itself and adds the pooled embedding
        settings.update(addition_embed_type="text_time", addition_time_embed_dim=config.size_embed_dim,
                        projection_class_embeddings_input_dim=u.adm_in_channels)
    return settings


def diffusers_unet(unet, config, attention):
    """diffusers' UNet2DConditionModel holding `unet`'s weights (renamed by diffusers' own single-file
    converter; the linear weights shared, the convs copied in diffusers' NCHW layout): the same model
    in diffusers' code, for timing side by side and checking that both compute the same."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers.models.attention_processor import AttnProcessor
    settings = diffusers_config(config)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**settings)
    state = {"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()}
    theirs.load_state_dict(convert_ldm_unet_checkpoint(state, settings), assign=True)
    if attention == "math":
        theirs.set_attn_processor(AttnProcessor())
    return theirs.eval().requires_grad_(False)


def official_selection(x, hw, ratio, noise_alpha=0.1, generator=None):
    """What the official SiTo/DaTo code does per block (SiTo's prune_and_recover_tokens): the full N x N cosine
    matrix, its row sums, and the candidate x base and kept x pruned similarities gathered out of it."""
    b, n, _ = x.shape
    (h, w), k = hw, int(n * ratio)
    m = F.normalize(x, dim=-1)
    gram = m @ m.transpose(1, 2)                                                   # [B, N, N]
    score = gram.sum(-1) + noise_alpha * torch.randn(b, n, generator=generator).to(x)
    choice = score.view(b, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(b, h // 2, w // 2, 4).argmax(-1)
    rows, cols = torch.arange(h // 2, device=x.device)[:, None], torch.arange(w // 2, device=x.device)[None]
    base = (rows * 2 + choice // 2) * w + cols * 2 + choice % 2
    order = torch.zeros(b, n, dtype=torch.long, device=x.device).scatter_(1, base.reshape(b, -1), -1).argsort(1)
    b_idx, a_idx = order[:, :base[0].numel()], order[:, base[0].numel():]
    ab = gram.gather(1, a_idx[..., None].expand(-1, -1, n)).gather(2, b_idx[:, None].expand(-1, a_idx.shape[1], -1))
    edges = ab.max(-1).values.argsort(-1, descending=True)
    pruned, kept = a_idx.gather(1, edges[:, :k]), torch.cat([a_idx.gather(1, edges[:, k:]), b_idx], 1)
    kp = gram.gather(1, kept[..., None].expand(-1, -1, n)).gather(2, pruned[:, None].expand(-1, kept.shape[1], -1))
    return kept, pruned, kp.argmax(1)


def kind_macs(unet, accel, plan, hw, matmuls=False):
    """Analytic MACs per image of one UNet call made as `plan` (a CallPlan) on an hw latent (model/macs.py),
    counted as a share of a guided call: a one-branch call costs half, a skipped one nothing."""
    if plan.skip:
        return 0
    prune = accel.prune if accel else None

    def keep(st, grid, sub):
        if sub == "attn2" and plan.cross == "cached":
            return 0
        if plan.ratio and prune.applies(grid, st.downsamples):
            return prune.tokens_into(sub, grid, plan.ratio)
        return grid[0] * grid[1]
    depth = None if plan.depth == FULL else plan.depth
    return plan.share * sum(unet_macs(unet, hw, depth=depth, keep=keep, matmuls=matmuls).values())


def run_plans(accel, calls, sigmas=None, stopped_at=-1):
    """The CallPlan of each UNet call of a run (the plain call for every call of the baseline, None), for an
    image whose adaptive guidance stopped at call `stopped_at` (-1: never; its guided calls from there on
    run one branch)."""
    plans = accel.plans(calls, sigmas) if accel is not None else [PLAIN] * calls
    if stopped_at < 0:
        return plans
    return [replace(p, guidance="cond") if i >= stopped_at and p.guidance == "both" else p
            for i, p in enumerate(plans)]


def run_macs(unet, accel, calls, hw, matmuls=False, sigmas=None, stopped_at=-1):
    """Analytic MACs per image of a whole run of `calls` UNet calls (None: the baseline); with adaptive
    guidance, of an image that stopped at call `stopped_at` (its PNG metadata's guidance_stopped_at)."""
    return sum(kind_macs(unet, accel, plan, hw, matmuls) for plan in run_plans(accel, calls, sigmas, stopped_at))


def cpu_description():
    """'<model name>, N cores, <bf16 units>' for reports (Linux /proc/cpuinfo; else what platform knows)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    units = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"),
                                       ("avx2", "AVX2")) if flag in flags]
    bf16 = "native bf16" if native_bf16_cpu() else "no native bf16"
    return f"{name}, {os.cpu_count()} cores, {'+'.join(units) or 'unknown SIMD'} ({bf16})"
