"""The state of one accelerated sampling run (AcceleratedRun) and what it is made from
(Acceleration: a token method's settings and a cache schedule), with the analytic MACs a run costs.

prune/ (token plans per block) and cache/ (which calls are full, how deep the others recompute)
know nothing of each other; this is where they meet. The UNet never keeps state between calls:
everything that spans the calls of one sampling run (the call index, the last two raw outputs for
DaTo's dynamics map, the cached features, the token methods' random stream) lives in an
AcceleratedRun, which the sampler makes fresh for every batch (Acceleration.start) and passes to
each UNet call. The UNet sees it only through the contract model.unet.RunState; the sampler only
through `check(calls)` and `start(calls, seed, guided)`. Nothing leaks between runs.
"""
from dataclasses import asdict, dataclass

import torch

from cache import FULL, CacheSchedule
from model.macs import unet_macs
from model.unet import BasicTransformerBlock
from prune import LAYERS, TokenMethod, as_record
from prune.dato import dynamics_map
from prune.viz import PruneViz
from sampler import stream_seed

NO_PLANS = (None, None, None)


@dataclass(frozen=True)
class Acceleration:
    """What to accelerate (one per command line / experiment). With everything off the UNet
    runs its plain forward, bit for bit.

    prune: a token method's settings (prune.METHODS) or None. cache: CacheSchedule or None.
    viz: PruneViz (pictures of one block's plans) or None.
    """
    prune: TokenMethod | None = None
    cache: CacheSchedule | None = None
    viz: PruneViz | None = None

    def __post_init__(self):
        if self.prune is not None and not isinstance(self.prune, TokenMethod):
            raise ValueError(f"prune must be a token method's settings (prune.token_method), got "
                             f"{type(self.prune).__name__}")
        if self.cache is not None and not isinstance(self.cache, CacheSchedule):
            raise ValueError(f"cache must be a CacheSchedule, got {type(self.cache).__name__}")
        if self.viz is not None and not isinstance(self.viz, PruneViz):
            raise ValueError(f"viz must be a prune.viz.PruneViz or None, got {type(self.viz).__name__}")
        if self.viz is not None and self.prune is None:
            raise ValueError("--viz-prune draws a token method's plans: give a token method (--prune) too")
        if self.viz is not None and self.prune.reduces != "tokens":
            raise ValueError(f"--viz-prune draws which tokens were kept and removed; {self.prune.name} removes none")

    def record(self):
        """JSON-ready settings (PNG metadata, evaluate.py's method folders): the method named."""
        return {"prune": as_record(self.prune) if self.prune is not None else None,
                "cache": asdict(self.cache) if self.cache is not None else None,
                "viz": asdict(self.viz) if self.viz is not None else None}

    def check(self, calls):
        """Raise ValueError if the schedules do not fit a run of `calls` UNet calls."""
        if self.prune is not None:
            self.prune.check_calls(calls)
        if self.cache is not None:
            self.cache.depths_for(calls)

    def check_unet(self, unet, hw, calls, rows):
        """Raise ValueError unless this acts on `unet` (model.unet.UNetModel) at an hw latent in a run of
        `calls` UNet calls on batches of `rows`: a token method must fit at least one transformer block
        (else it would silently change nothing), a cache depth must be below the UNet's number of output
        blocks, a picture's block must be one the method acts on and its row one of the batch's."""
        if self.prune is not None:
            grids = set()
            unet_macs(unet, hw, keep=lambda st, grid, sub: grids.add((grid, st.level)) or 0)
            if not any(self.prune.applies(grid, level) for grid, level in grids):
                largest = "x".join(map(str, max((g for g, _ in grids), key=lambda g: g[0] * g[1])))
                raise ValueError(f"--prune {self.prune.name} acts on no transformer block at a {hw[0]}x{hw[1]} latent "
                                 f"(max_downsample {self.prune.max_downsample}; the largest block grid is {largest}): "
                                 "its cells or factor do not fit; choose a larger image, smaller cells or a smaller "
                                 "factor")
        if self.viz is not None:
            blocks = {name: m for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}
            acted = [name for name, m in blocks.items() if 2 ** m.level <= self.prune.max_downsample]
            if self.viz.block not in acted:
                what = ("is not acted on by the token method" if self.viz.block in blocks else
                        "is not a transformer block")
                raise ValueError(f"--viz-block {self.viz.block!r} {what} of this UNet; choose one of "
                                 f"{', '.join(acted[:4])}{', ...' if len(acted) > 4 else ''} ({len(acted)} in all)")
            if not -rows <= self.viz.row < rows:
                raise ValueError(f"PruneViz row {self.viz.row} is not a row of this run's batches of {rows}")
        blocks = len(unet.output_blocks)
        if (deepest := max((d for d in self.depths(calls) if d != FULL), default=0)) >= blocks:
            raise ValueError(f"cache depth {deepest} does not fit this UNet's {blocks} output blocks (cached depths "
                             f"0 .. {blocks - 1}; {FULL} is a full call)")

    def depths(self, calls):
        """The cache depth of each UNet call of a run (FULL for full calls)."""
        return self.cache.depths_for(calls) if self.cache is not None else [FULL] * calls

    def start(self, calls, seed, guided=False):
        """A fresh AcceleratedRun for a run of `calls` UNet calls, its random stream derived from
        `seed`; `guided`: every call's batch is [uncond; cond] (classifier-free guidance)."""
        return AcceleratedRun(self, calls, seed, guided)


def call_kinds(accel, calls):
    """The kind (cache depth, FULL for a full call; prune ratio) of each UNet call of a run."""
    kinds = []
    for i, depth in enumerate(accel.depths(calls) if accel else [FULL] * calls):
        ratio = accel.prune.ratio_at(i, calls) if accel and accel.prune else 0.0
        kinds.append((depth, ratio if depth else 0.0))   # depth 0 runs no transformer block: nothing to prune
    return kinds


def kind_macs(unet, accel, kind, hw, matmuls=False):
    """Analytic MACs per image of one UNet call of this kind on an hw latent (model/macs.py)."""
    depth, ratio = kind
    prune = accel.prune if accel else None

    def keep(st, grid, sub):
        if ratio and prune.applies(grid, st.level):
            return prune.tokens_into(sub, grid, ratio)
        return grid[0] * grid[1]
    return sum(unet_macs(unet, hw, depth=None if depth == FULL else depth, keep=keep, matmuls=matmuls).values())


def run_macs(unet, accel, calls, hw, matmuls=False):
    """Analytic MACs per image of a whole run of `calls` UNet calls (None: the baseline)."""
    return sum(kind_macs(unet, accel, kind, hw, matmuls) for kind in call_kinds(accel, calls))


class AcceleratedRun:
    """State of one accelerated sampling run; implements model.unet.RunState.

    The sampler calls begin_call(i, x) before and end_call(output) after UNet call i. During the
    call the UNet reads `depth` (None: a full call, or d: recompute d blocks on each side, the rest
    from `features`; model.unet.RunState), hands the output-block results it computed to remember(), and its transformer
    blocks ask token_plans() for their plans.
    """

    def __init__(self, settings, calls, seed, guided=False):
        self.depths, self.calls = settings.depths(calls), calls
        self.settings, self.seed, self.guided = settings, seed, guided
        self.call = None            # index of the UNet call in progress, 0 .. calls-1
        self.depth = None           # cache depth of the call in progress (None: full)
        self.features = None        # newest result of each output block (only when caching)
        self.generator = None       # the token methods' random stream, on the latent's device
        self.outputs = (None, None)  # the two most recent raw UNet outputs, oldest first
        self.dynamics = None        # DaTo's D for the call in progress: [B, h, w] or None

    def begin_call(self, index, x):
        """UNet call `index` on latent x [B, c, h, w] is about to run."""
        depth = self.depths[index]
        self.call, self.depth = index, None if depth == FULL else depth
        if self.generator is None:   # on the run's device: a CPU draw copied to a GPU would sync every block
            self.generator = torch.Generator(x.device).manual_seed(stream_seed(self.seed, "accel"))
        prune = self.settings.prune
        self.dynamics = dynamics_map(*self.outputs) if prune is not None and prune.uses_dynamics else None
        if self.dynamics is not None and self.dynamics.shape[0] != x.shape[0]:
            self.dynamics = None

    def end_call(self, output):
        self.outputs = (self.outputs[1], output)

    def remember(self, outputs):
        """The results of the last len(outputs) output blocks, just computed: a full call replaces
        all twelve, a cached call at depth d refreshes the last d, so a later, shallower call
        starts from the newest result of its entry block (DaTo's mixed-depth schedules)."""
        if self.settings.cache is None:
            return
        if self.features is None:
            self.features = list(outputs)
        else:
            self.features[len(self.features) - len(outputs):] = outputs

    def call_generator(self):
        """A fresh generator for one block that draws what every other block of this UNet call
        draws, and something new for each call (DaTo's local_random: the official code re-forks
        the global RNG in every block and nothing draws from it between the blocks of a call).
        Its own stream per call, so the run's shared stream (self.generator) is left untouched."""
        return torch.Generator(self.generator.device).manual_seed(stream_seed(self.seed, f"accel/call{self.call}"))

    def token_plans(self, x, hw, block, level):
        """A plan (prune/method.py) or None for self-attention, cross-attention and feed-forward of
        the transformer block named `block`, whose input is x [B, h*w, C], `level` x2 downsamplings
        below the UNet's top transformer level."""
        prune = self.settings.prune
        ratio = prune.ratio_at(self.call, self.calls) if prune is not None else 0
        if not ratio or not prune.applies(hw, level):
            return NO_PLANS
        generator = self.call_generator() if prune.same_draws_per_call else self.generator
        plan = prune.plan(x, hw, ratio, generator=generator, dynamics=self.dynamics, guided=self.guided)
        if self.settings.viz is not None:
            self.settings.viz.record(f"seed{self.seed}_call{self.call:03d}", block, hw, plan)
        return tuple(plan if layer in prune.layers else None for layer in LAYERS)

