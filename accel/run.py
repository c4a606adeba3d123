"""The state of one accelerated sampling run (AcceleratedRun) and what it is made from
(Acceleration: a token method's settings, a cache schedule, guidance per call, skipped calls, the
run's timesteps, a cross-attention gate).

prune/ (token plans per block), cache/ (which calls are full, how deep the others recompute),
guidance.py, skip.py and gate.py know nothing of each other; they meet here, as one CallPlan per
UNet call. The UNet keeps no state between calls: everything that spans one run's calls (the
plans, the cached features, the last outputs and estimates, the token method's own state) lives in
an AcceleratedRun, made fresh for every batch (Acceleration.start), so nothing leaks between runs.
The UNet sees it only through the contract model.unet.RunState; the sampler only through
`check(calls)`, `start(...)` and the run's `plans`, `guided_rows`, `begin_call`, `end_call`,
`extrapolated` and `delta`.
"""
import math
from dataclasses import asdict, dataclass

import torch

from cache import FULL, CacheSchedule
from model.macs import unet_macs
from model.unet import BasicTransformerBlock
from prune import LAYERS, TokenMethod, as_record
from prune.viz import PruneViz
from sampler import CallPlan, stream_seed
from sampler.schedule import SettingError, check_timesteps

from .gate import Gate
from .guidance import Guidance
from .skip import Skip

NO_PLANS = (None, None, None)


@dataclass(frozen=True)
class Acceleration:
    """What to accelerate (one per command line / experiment). With everything off the UNet
    runs its plain forward, bit for bit.

    prune: a token method's settings (prune.METHODS) or None. cache: CacheSchedule or None.
    viz: PruneViz (pictures of one block's plans) or None. guidance: Guidance (which calls are
    guided) or None: all. skip: Skip (calls replaced by extrapolation) or None.
    timesteps: the run's timesteps, one per step in sampling order (e.g. Align Your Steps'), or ():
    the sampler's own spacing. gate: Gate (T-GATE: cross-attention cached from a call on) or None.
    """
    prune: TokenMethod | None = None
    cache: CacheSchedule | None = None
    viz: PruneViz | None = None
    guidance: Guidance | None = None
    skip: Skip | None = None
    timesteps: tuple = ()
    gate: Gate | None = None

    def record(self):
        """JSON-ready settings (PNG metadata, evaluate.py's method folders): the method named.
        Guidance, skips and timesteps appear only when set, so older records stay the same."""
        record = {"prune": as_record(self.prune) if self.prune is not None else None,
                  "cache": asdict(self.cache) if self.cache is not None else None,
                  "viz": asdict(self.viz) if self.viz is not None else None}
        if record["cache"] is not None and not self.cache.order:
            del record["cache"]["order"]
        guidance = asdict(self.guidance) if self.guidance else None
        if guidance is not None and not guidance["stop"]:
            del guidance["stop"]
        extra = {"guidance": guidance,
                 "skip": list(self.skip.calls) if self.skip else None,
                 "timesteps": list(self.timesteps) or None,
                 "gate": self.gate.call if self.gate else None}
        return {**record, **{k: v for k, v in extra.items() if v is not None}}

    def depths(self, calls):
        """The cache depth of each UNet call of a run (FULL for full calls)."""
        return self.cache.depths_for(calls) if self.cache is not None else [FULL] * calls

    def plans(self, calls, sigmas=None):
        """The CallPlan of each UNet call of a run of `calls` calls at noise levels `sigmas` (one
        per call; a guidance window and a forecast need them). A call on which depth 0 runs no
        transformer block prunes nothing."""
        depths = self.depths(calls)
        modes = (self.guidance.modes_for(calls, sigmas) if self.guidance is not None
                 else ["both"] * calls)
        skipped = self.skip.skipped_for(calls) if self.skip is not None else [False] * calls
        cross = self.gate.cross_for(calls) if self.gate is not None else ["compute"] * calls
        if self.cache is not None and self.cache.order and sigmas is None:
            raise ValueError("a forecast (cache order > 0) needs the noise level of each UNet call "
                             "of the run")
        if self.guidance is None:   # past a gate, one branch: both would compute the same
            modes = ["cond" if c == "cached" else m for m, c in zip(modes, cross, strict=True)]
        plans = [CallPlan(modes[i], depths[i],
                          self.prune.ratio_at(i, calls) if self.prune and depths[i] else 0.0,
                          skipped[i], cross[i]) for i in range(calls)]
        check_plans(plans)
        return plans

    def start(self, calls, seed, guided=False, sigmas=None):
        """A fresh AcceleratedRun for a run of `calls` UNet calls at noise levels `sigmas`, its
        random streams derived from `seed`; `guided`: the run uses classifier-free guidance (its
        guided calls' batches are [uncond; cond])."""
        return AcceleratedRun(self, calls, seed, guided, sigmas)

    def __post_init__(self):
        for name, kind in (("prune", TokenMethod), ("cache", CacheSchedule), ("viz", PruneViz),
                           ("guidance", Guidance), ("skip", Skip), ("gate", Gate)):
            if (value := getattr(self, name)) is not None and not isinstance(value, kind):
                raise ValueError(f"{name} must be a {kind.__module__}.{kind.__name__} or None, got "
                                 f"{type(value).__name__}")
        if isinstance(self.timesteps, list):   # JSON's arrays: stored as the tuple they mean
            object.__setattr__(self, "timesteps", tuple(self.timesteps))
        if self.timesteps:
            check_timesteps(self.timesteps, len(self.timesteps))
        if (self.guidance is not None and self.guidance.stop
                and (self.cache is not None or self.gate is not None)):
            raise ValueError("adaptive guidance (a guidance stop) changes each call's batch per "
                             "image: it cannot be combined with a cache or a gate, whose kept "
                             "features need the whole guided batch")
        if self.viz is not None and self.prune is None:
            raise SettingError("viz", "draws a token method's plans: give a token method too")
        if self.viz is not None and self.prune.reduces != "tokens":
            raise SettingError("viz", "draws which tokens were kept and removed; "
                               f"{self.prune.name} removes none")

    def check(self, calls, sigmas=None):
        """Raise ValueError if the schedules do not fit a run of `calls` UNet calls (a guidance
        window and a forecast are checked when the run's noise levels `sigmas` are given)."""
        if self.prune is not None:
            self.prune.check_calls(calls)
        needs_sigmas = self.guidance is not None and self.guidance.window is not None or \
            self.cache is not None and self.cache.order
        if sigmas is not None or not needs_sigmas:
            self.plans(calls, sigmas)
        else:
            self.depths(calls)

    def check_unet(self, unet, hw, calls, rows):
        """Raise ValueError unless this acts on `unet` (model.unet.UNetModel) at an hw latent in a
        run of `calls` UNet calls on batches of `rows`: a token method must fit at least one
        transformer block (else it would silently change nothing), a cache depth must be below the
        UNet's number of output blocks, a picture's block must be one the method acts on and its
        row one of the batch's."""
        if self.prune is not None:
            grids = set()
            unet_macs(unet, hw, keep=lambda st, grid, sub: grids.add((grid, st.downsamples)) or 0)
            if not any(self.prune.applies(grid, down) for grid, down in grids):
                largest = "x".join(map(str, max((g for g, _ in grids), key=lambda g: g[0] * g[1])))
                raise SettingError("prune", f"{self.prune.name} acts on no transformer block at "
                                   f"a {hw[0]}x{hw[1]} latent (max_downsample "
                                   f"{self.prune.max_downsample}; the largest block grid is "
                                   f"{largest}): its cells or factor do not fit; choose a larger "
                                   "image, smaller cells or a smaller factor")
        if self.viz is not None:
            blocks = {name: m for name, m in unet.named_modules()
                      if isinstance(m, BasicTransformerBlock)}
            acted = [name for name, m in blocks.items()
                     if 2 ** m.downsamples <= self.prune.max_downsample]
            if self.viz.block not in acted:
                what = ("is not acted on by the token method" if self.viz.block in blocks else
                        "is not a transformer block")
                raise SettingError("block", f"{self.viz.block!r} {what} of this UNet; choose "
                                   f"one of {', '.join(acted[:4])}"
                                   f"{', ...' if len(acted) > 4 else ''} ({len(acted)} in all)")
            if not -rows <= self.viz.row < rows:
                raise ValueError(f"PruneViz row {self.viz.row} is not a row of this run's batches "
                                 f"of {rows}")
        blocks = len(unet.output_blocks)
        if (deepest := max((d for d in self.depths(calls) if d != FULL), default=0)) >= blocks:
            raise ValueError(f"cache depth {deepest} does not fit this UNet's {blocks} output "
                             f"blocks (cached depths 0 .. {blocks - 1}; {FULL} is a full call)")


def fitted(t, rows):
    """A batch tensor for a call on `rows` rows: a guided [uncond; cond] one gives its cond half."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] == 2 * rows:
        return t[rows:]
    raise ValueError(f"a cached tensor of {t.shape[0]} rows does not fit a UNet call on {rows}")


class AcceleratedRun:
    """State of one accelerated sampling run; implements model.unet.RunState.

    The sampler reads `plans[i]` before UNet call i: a skipped call is not made (its estimate is
    `extrapolated()`); otherwise it builds the call's batch (both guidance branches or one), calls
    begin_call(i, x) before and end_call(output, estimate, delta) after it. During the call the UNet
    reads `depth` (None: a full call, or d: recompute d blocks on each side, the rest from
    `features`; model.unet.RunState), hands the output-block results it computed to remember(),
    and its transformer blocks ask token_plans() for their plans.
    """

    def __init__(self, settings, calls, seed, guided=False, sigmas=None):
        self.plans, self.calls = settings.plans(calls, sigmas), calls
        self.settings, self.seed, self.guided = settings, seed, guided
        self.lambdas = ([-math.log(max(s, 1e-10)) for s in sigmas]   # λ = log(α/σ)
                        if sigmas is not None else None)
        self.call = None            # index of the UNet call in progress, 0 .. calls-1
        self.depth = None           # cache depth of the call in progress (None: full)
        self.features = None        # newest result of each output block (only when caching)
        self.history = []           # (λ, output-block results) of recent full calls (forecasts)
        self.outputs = (None, None)  # the two most recent raw UNet outputs, oldest first
        self.estimates = (None, None)  # the sampler's two most recent estimates, oldest first
        self.delta = None           # eps_c - eps_u of the last guided call (raw outputs)
        self.cross = {}             # T-GATE: each transformer block's kept cross-attention output
        self.stop = settings.guidance.stop if settings.guidance is not None else 0
        self.stopped_at = None      # adaptive guidance: each image's first unguided call (-1: none)
        self.rows = None            # adaptive guidance: images the current call guides (None: all)
        prune = settings.prune
        self.tokens = (prune.start(lambda name: stream_seed(seed, name)) if prune is not None
                       else None)

    def begin_call(self, index, x):
        """UNet call `index` on latent batch x [B, c, h, w] is about to run."""
        plan = self.plans[index]
        self.call, self.depth = index, None if plan.depth == FULL else plan.depth
        if self.depth is not None:   # cached: the remembered features, fitted to this batch
            rows = x.shape[0]
            self.features = [fitted(f, rows) for f in self.features]
            if self.settings.cache.order:
                self.forecast(len(self.features) - 1 - self.depth, rows)
        if self.tokens is not None:
            self.tokens.begin_call(index, x, self.outputs)

    def forecast(self, entry, rows):
        """Replace the cached result of output block `entry` by its Lagrange extrapolation in λ
        through the last (order + 1) full calls that hold this batch's rows (fewer while there are
        fewer; with one, the newest features are reused as at order 0)."""
        points = [(lam, fs[entry]) for lam, fs in self.history
                  if fs[entry].shape[0] in (rows, 2 * rows)]
        points = points[-(self.settings.cache.order + 1):]
        lam, value = self.lambdas[self.call], 0
        for j, (lam_j, feature) in enumerate(points):
            weight = math.prod((lam - lam_k) / (lam_j - lam_k)
                               for k, (lam_k, _) in enumerate(points) if k != j)
            value = value + weight * fitted(feature, rows)
        if len(points) > 1:
            self.features[entry] = value

    def guided_rows(self):
        """The images a guided call guides: None for all (always without adaptive guidance), else
        the indices of the images not yet stopped (guidance.py)."""
        self.rows = None
        if self.stopped_at is not None and (self.stopped_at >= 0).any():
            self.rows = (self.stopped_at < 0).nonzero().flatten()
        return self.rows

    def end_call(self, output, estimate=None, delta=None):
        """UNet call done: its raw output (None: skipped), the estimate the sampler receives and the
        guidance difference of a guided call (0 for the images it did not guide). With adaptive
        guidance the images whose two predictions now agree, cos(eps_c, eps_u) > stop, stop from
        the next call on."""
        if output is not None:
            self.outputs = (self.outputs[1], output)
        self.estimates = (self.estimates[1], estimate)
        if delta is not None:
            self.delta = delta
            if self.stop:
                cond = output[-delta.shape[0]:].to(delta.dtype).flatten(1)
                agree = torch.nn.functional.cosine_similarity(
                    cond, cond - delta.flatten(1), dim=1) > self.stop
                if self.stopped_at is None:
                    self.stopped_at = torch.full_like(agree, -1, dtype=torch.long)
                self.stopped_at[agree & (self.stopped_at < 0)] = self.call + 1

    def extrapolated(self):
        """The estimate of a skipped call: 2 e_(i-1) - e_(i-2) (skip.py)."""
        previous, latest = self.estimates
        return 2 * latest - previous

    def remember(self, outputs):
        """The results of the last len(outputs) output blocks, just computed: a full call replaces
        all twelve, a cached call at depth d refreshes the last d, so a later, shallower call
        starts from the newest result of its entry block (DaTo's mixed-depth schedules)."""
        if self.settings.cache is None:
            return
        if self.features is None or self.depth is None:
            self.features = list(outputs)
        else:
            self.features[len(self.features) - len(outputs):] = outputs
        if self.depth is None and self.settings.cache.order:   # one point per noise level
            lam = self.lambdas[self.call]   # PLMS evaluates one level twice
            self.history = ([p for p in self.history if p[0] != lam] + [(lam, list(outputs))])[-3:]

    def cross_attention(self, block):
        """The kept cross-attention output of block `block` on a call past the gate, else None."""
        return self.cross[block] if self.plans[self.call].cross == "cached" else None

    def remember_cross(self, block, out):
        """Block `block` computed its cross-attention output `out`: the gate call keeps the mean of
        its two branches ([uncond; cond] of a guided run; the output itself without guidance)."""
        if self.plans[self.call].cross == "keep":
            self.cross[block] = sum(out.chunk(2)) / 2 if self.guided else out

    def token_plans(self, x, hw, block, downsamples):
        """A plan (prune/method.py) or None for self-attention, cross-attention and feed-forward of
        the transformer block named `block`, whose input is x [B, h*w, C], `downsamples` x2
        downsamplings below the UNet's top transformer level."""
        prune, ratio = self.settings.prune, self.plans[self.call].ratio
        if not ratio or not prune.applies(hw, downsamples):
            return NO_PLANS
        guided = (self.guided and self.plans[self.call].guidance == "both"
                  and self.rows is None)   # a [uncond; cond] batch
        plan = self.tokens.plan(x, hw, ratio, guided)
        if self.settings.viz is not None:
            self.settings.viz.record(f"seed{self.seed}_call{self.call:03d}", block, hw, plan)
        return tuple(plan if layer in prune.layers else None for layer in LAYERS)


def check_plans(plans):
    """Raise ValueError for plans no run can follow: a reused guidance difference needs a guided
    call made before it; a guided cached call needs guided features (every call made since the last
    full call guided: a one-branch call keeps only the conditional half); the call that keeps the
    cross-attention (T-GATE) is made full and guided, and the calls that read it run one branch."""
    guided_before, features_guided = False, True
    for i, plan in enumerate(plans):
        if plan.cross == "keep" and (plan.skip or plan.depth != FULL or plan.guidance != "both"):
            raise ValueError(f"UNet call {i} keeps the cross-attention for the gate: it must be "
                             "made, full and guided (not skipped, cached or one-branch)")
        if plan.cross == "cached" and plan.guidance != "cond":
            raise ValueError(f"UNet call {i} is past the gate (cross-attention cached, the prompt "
                             f"no longer read): its guidance must be cond, got {plan.guidance}")
        if plan.skip:
            continue
        if plan.guidance == "reuse" and not guided_before:
            raise ValueError(f"UNet call {i} reuses the guidance difference, but no guided call is "
                             "made before it")
        if plan.depth != FULL and plan.guidance == "both" and not features_guided:
            raise ValueError(f"UNet call {i} is guided and cached, but a call since the last full "
                             "one ran one branch only: its features have no unconditional half")
        both = plan.guidance == "both"
        guided_before |= both
        features_guided = both if plan.depth == FULL else features_guided and both
