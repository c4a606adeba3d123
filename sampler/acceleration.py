"""Run-time acceleration: what to accelerate (Acceleration, the published presets, the method
specs of the command-line tools) and the state of one accelerated sampling run (AcceleratedRun).

prune/ (token plans per block) and cache/ (which calls are full, how deep the others recompute)
know nothing of each other; this module is where they meet. The UNet never keeps state between
calls: everything that spans the calls of one sampling run (the call index, the last two raw
outputs for DaTo's dynamics map, the cached features, the token methods' random stream) lives in
an AcceleratedRun, which the sampler makes fresh for every batch and passes to each UNet call.
The UNet sees it only through the contract model.unet.RunState. Nothing leaks between runs.
"""
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from cache import DATO_COCO, DATO_FIXED, FULL, CacheSchedule, from_dato
from model.macs import unet_macs
from prune import LAYERS, METHODS, TokenPruning, max_ratio
from prune.dato import dynamics_map
from prune.viz import PruneViz

from .samplers import SAMPLERS, unet_calls

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

    def depths(self, calls):
        """The cache depth of each UNet call of a run (FULL for full calls)."""
        return self.cache.depths_for(calls) if self.cache is not None else [FULL] * calls

    def start(self, calls, seed, guided=False):
        """A fresh AcceleratedRun for a run of `calls` UNet calls, its random stream derived from
        `seed`; `guided`: every call's batch is [uncond; cond] (classifier-free guidance)."""
        return AcceleratedRun(self, calls, seed, guided)


@dataclass(frozen=True)
class Preset:
    """Settings under a name (sample.py --preset NAME, bench.py / evaluate.py --methods NAME): a published
    one, or a schedule file (FILE.json or FILE.json#k, e.g. what search.py found)."""
    cache: CacheSchedule | None
    prune: TokenPruning | None
    about: str
    run: tuple | None = None   # (sampler, steps) the per-call schedule was made for (None: any run)

    def acceleration(self):
        return Acceleration(self.prune, self.cache)


PRESETS = {
    "deepcache-n3": Preset(CacheSchedule("uniform", interval=3, depth=2), None,
                           "DeepCache SD1.5 N=3 (paper: 1.72x), a full call every 3 calls, depth 2"),
    "deepcache-n5": Preset(CacheSchedule("uniform", interval=5, depth=2), None,
                           "DeepCache SD1.5 (paper: 2.15x), a full call every 5 calls, depth 2"),
    "deepcache-n5-nonuniform": Preset(CacheSchedule("nonuniform", interval=5, depth=2, center=15, power=1.4), None,
                                      "DeepCache SD1.5 non-uniform: full calls denser around call 15 (c=15, p=1.4)"),
    # DaTo's pruning ratio is 0.4 throughout: its released code hard-codes it (README, "Differences ...")
    "dato-fixed": Preset(CacheSchedule("dato", depths=from_dato(DATO_FIXED)),
                         TokenPruning("dato", ratio=0.4, gamma=0.1),
                         "DaTo: the cache vector its ratio searches use (6 full, 38 shallow, 7 reuse) + DaTo pruning "
                         "at 0.4 as in those searches (txt2img_gen): dynamics base tokens, gamma=0.1, noise_alpha=0.1; "
                         "for PLMS-50", run=("plms", 50)),
    "dato-coco": Preset(CacheSchedule("dato", depths=from_dato(DATO_COCO)), TokenPruning("dato", ratio=0.4),
                        "DaTo: the vector it evaluates with pruning on COCO-30k (5 full, 21 shallow, 25 reuse) + DaTo "
                        "pruning at 0.4 as the official run_command9: dynamics base tokens, gamma=1, noise_alpha=0.1; "
                        "for PLMS-50", run=("plms", 50)),
    "dato-coco-random": Preset(CacheSchedule("dato", depths=from_dato(DATO_COCO)),
                               TokenPruning("dato", ratio=0.4, base_tokens="local_random"),
                               "DaTo: the dato-coco cache vector + DaTo pruning at 0.4 as the official run_command8: "
                               "local_random base tokens (one random pattern per UNet call); for PLMS-50",
                               run=("plms", 50)),
}

METHOD_SYNTAX = (f"'baseline', 'tome:R', 'sito:R', 'dato:R' (token pruning at ratio R, 0 <= R <= {max_ratio():g}), "
                 f"a preset ({', '.join(PRESETS)}) or a schedule file (FILE.json, FILE.json#k), each optionally "
                 "on its own run: SPEC@SAMPLER:STEPS (baseline@dpmpp-2m:20)")


def schedule_entry(accel, sampler, steps, about="", **extra):
    """One schedule of a schedule file: the per-call cache depths and pruning of `accel` for a run of
    `sampler` with `steps` steps, spelled out call by call; `extra` (e.g. measured quality) is kept."""
    calls = unet_calls(steps, sampler)
    prune = None
    if accel.prune is not None:
        prune = {**asdict(accel.prune), "layers": list(accel.prune.layers),
                 "schedule": [accel.prune.ratio_at(i) for i in range(calls)]}
    return {"sampler": sampler, "steps": steps, "depths": list(accel.depths(calls)), "prune": prune,
            "about": about, **extra}


def is_schedule_file(spec):
    return spec.partition("#")[0].endswith(".json")


def load_schedule(spec):
    """The Preset of a schedule file: 'FILE.json' (a file of one schedule) or 'FILE.json#k' (point k of a
    file of several under "points", as search.py writes its Pareto set)."""
    path, hash_, index = spec.partition("#")
    if not os.path.isfile(path):
        raise ValueError(f"schedule file {path!r} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"schedule file {path!r} is not readable JSON ({e})") from None
    points = data.get("points", [data]) if isinstance(data, dict) else None
    if not isinstance(points, list) or not points:
        raise ValueError(f"schedule file {path!r}: expected a schedule or {{\"points\": [schedules]}}")
    if not hash_ and len(points) > 1:
        raise ValueError(f"schedule file {path!r} holds {len(points)} schedules: pick one, {path}#0 .. "
                         f"{path}#{len(points) - 1}")
    if not (index if hash_ else "0").isdigit() or int(index or 0) >= len(points):
        raise ValueError(f"{spec!r}: {path} holds schedules #0 .. #{len(points) - 1}")
    entry = points[int(index or 0)]
    try:
        depths, prune = tuple(entry["depths"]), entry.get("prune")
        cache = CacheSchedule("dato", depths=depths) if any(d != FULL for d in depths) else None
        if prune is not None:
            prune = TokenPruning(**{**prune, "layers": tuple(prune["layers"]), "schedule": tuple(prune["schedule"])})
        run = (entry["sampler"], entry["steps"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{spec!r} is not a valid schedule ({type(e).__name__}: {e})") from None
    if len(depths) != unet_calls(run[1], run[0]):
        raise ValueError(f"{spec!r}: {len(depths)} depths for {run[0].upper()}-{run[1]}, which makes "
                         f"{unet_calls(run[1], run[0])} UNet calls")
    return Preset(cache, prune, entry.get("about", ""), run)


def find_preset(spec):
    """A preset by name, or a schedule file."""
    if spec in PRESETS:
        return PRESETS[spec]
    if is_schedule_file(spec):
        return load_schedule(spec)
    raise ValueError(f"unknown preset {spec!r}: use one of {', '.join(PRESETS)} or a schedule file FILE.json[#k]")


def parse_method(spec):
    """A method spec of the command-line tools -> Acceleration, or None for 'baseline'.

    'baseline' | 'tome:R' | 'sito:R' | 'dato:R' (R: prune ratio, 0.5 if left out) | a preset name |
    a schedule file.
    """
    if spec == "baseline":
        return None
    if spec in PRESETS or is_schedule_file(spec):
        return find_preset(spec).acceleration()
    name, colon, ratio = spec.partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {spec!r}: use {METHOD_SYNTAX}")
    try:
        value = float(ratio) if colon else 0.5
    except ValueError:
        raise ValueError(f"method {spec!r}: the ratio {ratio!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"method {spec!r}: the ratio must be a finite number")
    return Acceleration(TokenPruning(name, ratio=value))


@dataclass(frozen=True)
class Method:
    """One entry of the tools' --methods: an acceleration (None: the plain run) on a run of `sampler`
    with `steps` steps."""
    accel: Acceleration | None
    sampler: str
    steps: int

    @property
    def calls(self):
        return unet_calls(self.steps, self.sampler)


def parse_run(spec, text):
    """'dpmpp-2m:20' (the part of a method spec after '@') -> (sampler, steps)."""
    sampler, colon, steps = text.partition(":")
    if sampler not in SAMPLERS or not colon or not steps.isdigit():
        raise ValueError(f"method {spec!r}: after '@' give SAMPLER:STEPS, e.g. {spec.partition('@')[0]}@dpmpp-2m:20 "
                         f"(samplers: {', '.join(SAMPLERS)})")
    unet_calls(int(steps), sampler)   # validates the step count
    return sampler, int(steps)


def parse_run_method(spec, sampler, steps):
    """One method spec 'SPEC' or 'SPEC@SAMPLER:STEPS' -> Method. Without '@' the method runs on the
    command's run (`sampler`, `steps`), except a schedule file, which keeps the run it records."""
    base, at, run = spec.partition("@")
    if at:
        sampler, steps = parse_run(spec, run)
    elif is_schedule_file(base):
        sampler, steps = find_preset(base).run
    accel = parse_method(base)
    if base in PRESETS or is_schedule_file(base):
        check_preset_fits(base, sampler, steps)
    if accel is not None:
        accel.check(unet_calls(steps, sampler))
    return Method(accel, sampler, steps)


def parse_methods(text, sampler, steps):
    """A comma-separated list of method specs (the tools' --methods) -> {spec: Method}, each on its own run
    (SPEC@SAMPLER:STEPS) or on the command's (`sampler` with `steps` steps), and checked against it."""
    specs = [spec.strip() for spec in text.split(",")]
    if not all(specs) or len(set(specs)) != len(specs):
        raise ValueError(f"--methods {text!r}: give a comma-separated list of distinct methods")
    return {spec: parse_run_method(spec, sampler, steps) for spec in specs}


def call_kinds(accel, calls):
    """The kind (cache depth, FULL for a full call; prune ratio) of each UNet call of a run."""
    kinds = []
    for i, depth in enumerate(accel.depths(calls) if accel else [FULL] * calls):
        ratio = accel.prune.ratio_at(i) if accel and accel.prune else 0.0
        kinds.append((depth, ratio if depth else 0.0))   # depth 0 runs no transformer block: nothing to prune
    return kinds


def kind_macs(unet, accel, kind, hw, matmuls=False):
    """Analytic MACs per image of one UNet call of this kind on an hw latent (model/macs.py)."""
    depth, ratio = kind
    prune = accel.prune if accel else None

    def keep(st, grid, sub):
        n = grid[0] * grid[1]
        pruned = ratio and sub in prune.layers and prune.applies(grid, hw[0] * hw[1])
        return n - int(n * ratio) if pruned else n
    return sum(unet_macs(unet, hw, depth=depth, keep=keep, matmuls=matmuls).values())


def run_macs(unet, accel, calls, hw, matmuls=False):
    """Analytic MACs per image of a whole run of `calls` UNet calls (None: the baseline)."""
    return sum(kind_macs(unet, accel, kind, hw, matmuls) for kind in call_kinds(accel, calls))


def check_preset_fits(spec, sampler, steps):
    """A preset or schedule file made for one run (DaTo's PLMS-50 vectors) is refused for another, by name."""
    preset = find_preset(spec)
    if preset.run is not None and preset.run != (sampler, steps):
        made, calls = preset.run, unet_calls(preset.run[1], preset.run[0])
        raise ValueError(f"preset {spec} is for {made[0].upper()}-{made[1]} ({calls} UNet calls); this run is "
                         f"{sampler.upper()}-{steps} ({unet_calls(steps, sampler)} calls): use --sampler {made[0]} "
                         f"--steps {made[1]} (or {spec}@{made[0]}:{made[1]} in --methods)")


class AcceleratedRun:
    """State of one accelerated sampling run; implements model.unet.RunState.

    The sampler calls begin_call(i, x) before and end_call(output) after UNet call i. During the
    call the UNet reads `depth` (FULL, or d: recompute d blocks on each side, the rest from
    `features`), hands the output-block results it computed to remember(), and its transformer
    blocks ask token_plans() for (prune, recover) pairs.
    """

    def __init__(self, settings, calls, seed, guided=False):
        self.depths = settings.depths(calls)
        self.settings, self.seed, self.guided = settings, seed, guided
        self.call = None            # index of the UNet call in progress, 0 .. calls-1
        self.depth = FULL           # cache depth of the call in progress
        self.features = None        # newest result of each output block (only when caching)
        self.generator = None       # the token methods' random stream, on the latent's device
        self.outputs = (None, None)  # the two most recent raw UNet outputs, oldest first
        self.latent_tokens = None   # h * w of the latent of the call in progress
        self.dynamics = None        # DaTo's D for the call in progress: [B, h, w] or None

    def begin_call(self, index, x):
        """UNet call `index` on latent x [B, c, h, w] is about to run."""
        self.call, self.depth, self.latent_tokens = index, self.depths[index], x.shape[-2] * x.shape[-1]
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

    def token_plans(self, x, hw, block):
        """(prune, recover) pairs or None for self-attention, cross-attention and feed-forward
        of the transformer block named `block`, whose input is x [B, h*w, C]."""
        prune = self.settings.prune
        ratio = prune.ratio_at(self.call) if prune is not None else 0
        if not ratio or not prune.applies(hw, self.latent_tokens):
            return NO_PLANS
        generator = self.call_generator() if prune.same_draws_per_call else self.generator
        plan = prune.plan(x, hw, ratio, generator=generator, dynamics=self.dynamics, guided=self.guided)
        if self.settings.viz is not None:
            self.settings.viz.record(f"seed{self.seed}_call{self.call:03d}", block, hw, plan)
        return tuple(plan if layer in prune.layers else None for layer in LAYERS)
