"""Acceleration settings, and the per-run state the sampler creates from them for each batch.

The UNet never keeps state between calls: everything that spans calls of one sampling run (the
call index, the previous raw outputs, cached features, the random generator of the token
methods) lives in a RunState, which the sampler makes fresh for every batch and passes to each
UNet call as `accel`. Nothing leaks from one run into the next.
"""
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cache import FULL, CacheSchedule
from prune import LAYERS, TokenPruning
from prune.viz import PruneViz

NO_PLANS = (None, None, None)


def stream_seed(seed, stream):
    """The seed of the random stream named `stream` in the run seeded `seed`. The run's x_T is
    drawn from `seed` itself; hashing keeps the other streams (DDIM noise, token selection)
    independent of it and of each other."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stream}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Acceleration:
    """What to accelerate (one per command line / experiment). With everything off the UNet
    runs its plain forward, bit for bit.

    prune: TokenPruning settings or None. cache: CacheSchedule or None.
    viz: PruneViz (pictures of one block's plans) or None.
    """
    prune: TokenPruning | None = None
    cache: CacheSchedule | None = None
    viz: PruneViz | None = None

    def check(self, calls):
        """Raise ValueError if the schedules do not fit a run of `calls` UNet calls."""
        if self.prune is not None:
            self.prune.check_calls(calls)
        if self.cache is not None:
            self.cache.depths_for(calls)

    def start(self, calls, seed, guided=False):
        """A fresh RunState for a run of `calls` UNet calls, its random stream derived from
        `seed`; `guided`: every call's batch is [uncond; cond] (classifier-free guidance)."""
        return RunState(self, calls, seed, guided)


class RunState:
    """State of one sampling run. The sampler calls begin_call(i, x) before and end_call(output)
    after UNet call i. During the call the UNet reads `depth` (None: a full call; d: recompute
    d blocks on each side, the rest from `features`), hands the output-block results it computed
    to remember(), and its transformer blocks ask for token plans."""

    def __init__(self, settings, calls, seed, guided=False):
        settings.check(calls)
        self.depths = settings.cache.depths_for(calls) if settings.cache is not None else None
        self.settings, self.seed, self.guided = settings, seed, guided
        self.call = None            # index of the UNet call in progress, 0 .. calls-1
        self.depth = None           # cache depth of the call in progress (None: full)
        self.features = None        # newest result of each output block (only when caching)
        self.generator = None       # the token methods' random stream, on the latent's device
        self.outputs = []           # the two most recent raw UNet outputs, oldest first
        self.latent_tokens = None   # h * w of the latent of the call in progress
        self.dynamics = None        # DaTo's D for the call in progress: [B, h, w] or None

    def begin_call(self, index, x):
        """UNet call `index` on latent x [B, 4, h, w] is about to run."""
        self.call, self.latent_tokens = index, x.shape[-2] * x.shape[-1]
        if self.generator is None:   # on the run's device: a CPU draw copied to a GPU would sync every block
            self.generator = torch.Generator(x.device).manual_seed(stream_seed(self.seed, "accel"))
        depth = self.depths[index] if self.depths is not None else FULL
        self.depth = None if depth == FULL else depth
        prune = self.settings.prune
        self.dynamics = None
        if prune is not None and prune.method == "dato" and len(self.outputs) == 2 \
                and self.outputs[0].shape == self.outputs[1].shape and self.outputs[1].shape[0] == x.shape[0]:
            # how much each position's prediction moved between the last two calls
            self.dynamics = (self.outputs[1].float() - self.outputs[0].float()).abs().mean(dim=1)

    def end_call(self, output):
        self.outputs = [*self.outputs[-1:], output]

    def remember(self, outputs):
        """The results of the last len(outputs) output blocks, just computed: a full call replaces
        all twelve, a cached call at depth d refreshes the last d, so a later, shallower call
        starts from the newest result of its entry block (DaTo's mixed-depth schedules)."""
        if self.depths is None:
            return
        if self.features is None:
            self.features = list(outputs)
        else:
            self.features[len(self.features) - len(outputs):] = outputs

    def token_plans(self, x, hw, block):
        """(prune, recover) pairs or None for self-attention, cross-attention and feed-forward
        of the transformer block named `block`, whose input is x [B, h*w, C]."""
        prune = self.settings.prune
        ratio = prune.ratio_at(self.call) if prune is not None else 0
        if not ratio or not prune.applies(hw, self.latent_tokens):
            return NO_PLANS
        dynamics = self.dynamics
        if dynamics is not None and tuple(dynamics.shape[-2:]) != tuple(hw):   # a deeper block: pool D to its grid
            dynamics = F.adaptive_avg_pool2d(dynamics[:, None], hw)[:, 0]
        plan = prune.plan(x, hw, ratio, generator=self.generator, dynamics=dynamics, guided=self.guided)
        if self.settings.viz is not None:
            self.settings.viz.record(f"seed{self.seed}_call{self.call:03d}", block, hw, plan)
        return tuple(plan if layer in prune.layers else None for layer in LAYERS)
