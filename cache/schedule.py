"""Which UNet calls of a run are full and how deep the others recompute (DeepCache, DaTo).

A cache depth d is how many blocks a cached call recomputes on each side of the UNet, the rest
coming from the newest remembered outputs; model.unet.RunState is its one definition. On SD1/SD2
depth 1 is DeepCache's shallowest branch, depth 2 the branch of its SD paper numbers, depth 0
re-runs only the final `out` layer (docs/caching.md). A schedule is one depth per UNet call of
the run (FULL for full calls), keyed by call index within the run (sampler/samplers.py says how
many calls a run makes).
"""
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

# How schedules write "a full call" (the whole UNet runs), as DaTo's files do; on SD1/SD2 it is
# also the number of output blocks. A cached depth must be below the UNet's number of output
# blocks, which the UNet checks (model.unet.RunState); below FULL is what a schedule can say.
FULL = 12
MAX_POWER = 10   # of DeepCache's non-uniform curve (its search found ~1.4 best)

# DaTo's released cache vectors (github.com/EvelynZhang-epiclab/DaTo, sd1/scripts): entry i is
# UNet call i + 1 of a PLMS-50 run (call 0 is always full); 0 = reuse everything, 1 = shallow,
# and its code treats every value >= 2 (written 11 or 12) as a full call.
DATO_FIXED = (0, 1, 1, 1, 1, 1, 11, 1, 1, 1, 1, 1, 1, 1, 0, 0, 11, 1, 1, 1, 0, 11, 1, 0, 1,
              1, 1, 1, 1, 11, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 11, 1, 1, 1, 1, 1, 1, 1, 1, 1)
DATO_COCO = (1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 12, 1, 0, 0, 0, 1, 1, 0, 1, 0, 12, 0,
             0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 12, 0, 0, 0, 0, 0, 0, 1, 0, 1, 12, 0, 1, 0, 1)


def from_dato(vector):
    """A DaTo 50-entry vector -> our 51-entry per-call depths (full first; >= 2 -> FULL)."""
    return (FULL,) + tuple(FULL if v >= 2 else v for v in vector)


def deepcache_nonuniform(total, n, center=15, power=1.4):
    """The n full-call indices of DeepCache's non-uniform schedule among `total` calls, densest
    around `center`; `power` is lowered by 0.02 until n distinct indices come out. The curve's
    first point is complex (a root of -center): only its real part survives, as in DeepCache's
    code (docs/caching.md).
    """
    p = power
    while p > 1:
        lo, hi = complex(-center) ** (1 / p), complex(total - center) ** (1 / p)
        values = sorted({int(((lo + (hi - lo) * k / n) ** p).real) for k in range(n + 1)})
        indices = [0] + [v + center for v in values[1:-1]]
        if len(indices) == n:
            return indices
        p -= 0.02
    raise ValueError(f"DeepCache's non-uniform schedule cannot place {n} full calls among {total} "
                     f"around call {center}; lower the centre or raise the interval")


@dataclass(frozen=True)
class CacheSchedule:
    """Feature caching settings; the defaults are DeepCache's SD1.5 setting.

    mode: a row of MODES: "uniform" (a full call every `interval` calls), "nonuniform"
        (DeepCache's: as many full calls, denser around `center` with exponent `power`), or "dato"
        (explicit `depths`).
    interval: calls per full call for uniform/nonuniform (DeepCache SD1.5: 5; 3 is gentler).
    depth: depth of the cached calls for uniform/nonuniform (2: DeepCache SD; 1: DeepCache's
        LDM runs and DaTo; 0 repeats the last output).
    center, power: non-uniform shape (DeepCache: 15, 1.4; its search found c ~ 15, p ~ 1.4 best).
    depths: "dato" mode: one depth per UNet call, FULL (12) for full calls; call 0 must be full.
    order: what a cached call starts from: 0 the newest remembered features (DeepCache, DaTo);
        1 or 2 a forecast, the features extrapolated in λ = log(α/σ) from the last 2 or 3 full
        calls (linear or quadratic). Fewer full calls so far: lower.

    Everything is keyed by UNet-call index: uniform full calls are range(0, calls, interval)
    (interval 1: every call full), non-uniform ones DeepCache's formula with `calls` points
    (DeepCache's own pipeline differs slightly: docs/caching.md).
    """
    mode: str = "uniform"
    interval: int = 5
    depth: int = 2
    center: int = 15
    power: float = 1.4
    depths: tuple = ()
    order: int = 0

    def depths_for(self, calls):
        """The per-call depths of a run of `calls` UNet calls."""
        return MODES[self.mode].depths(self, calls)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown cache mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(self.depths, list):   # JSON's arrays: stored as the tuple they mean
            object.__setattr__(self, "depths", tuple(self.depths))
        if not isinstance(self.depths, tuple):
            raise ValueError(f"cache depths must be one depth per UNet call (a tuple), "
                             f"got {self.depths!r}")
        if isinstance(self.power, bool) or not isinstance(self.power, numbers.Real):
            raise ValueError(f"non-uniform power must be a number, got {self.power!r}")
        for name, value in (("interval", self.interval), ("depth", self.depth),
                            ("center", self.center), ("order", self.order),
                            *(("depths", d) for d in self.depths)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):   # numpy's too
                raise ValueError(f"cache {name} must be a whole number (of UNet calls or blocks), "
                                 f"got {value!r}")
        if self.interval < 1:
            raise ValueError(f"cache interval must be >= 1, got {self.interval}")
        if not 0 <= self.depth < FULL:
            raise ValueError(f"cache depth must be in 0..{FULL - 1} (cached calls recompute that "
                             f"many blocks on each side), got {self.depth}")
        if ("depths" in MODES[self.mode].reads) != bool(self.depths):
            raise ValueError("cache mode 'dato' needs an explicit per-call depth vector"
                             if not self.depths else
                             f"cache mode {self.mode!r} computes its own depths; use mode 'dato' "
                             "for an explicit vector")
        if self.order not in FORECAST_ORDERS:
            raise ValueError(f"cache order (forecast) must be one of {FORECAST_ORDERS} (0: reuse), "
                             f"got {self.order}")
        if bad := [d for d in self.depths if not 0 <= d <= FULL]:
            raise ValueError(f"cache depths must be in 0..{FULL} ({FULL} = full call), got {bad}")
        if self.mode == "nonuniform" and not 1 < self.power <= MAX_POWER:
            raise ValueError(f"non-uniform power must be in (1, {MAX_POWER}] (DeepCache: 1.4), "
                             f"got {self.power}")
        if self.center < 0:
            raise ValueError(f"center (of the non-uniform schedule) must be a UNet call index "
                             f">= 0, got {self.center}")


def uniform_depths(s, calls):
    return [s.depth if i % s.interval else FULL for i in range(calls)]


def nonuniform_depths(s, calls):
    if s.center >= calls:   # the curve would centre beyond the run: about uniform, silently
        raise ValueError(f"center {s.center} (of the non-uniform schedule) is not a UNet call of "
                         f"this run (0 .. {calls - 1}): full calls would centre on nothing; choose "
                         f"a center below {calls}")
    full = set(deepcache_nonuniform(calls, math.ceil(calls / s.interval), s.center, s.power))
    return [FULL if i in full else s.depth for i in range(calls)]


def explicit_depths(s, calls):
    if len(s.depths) != calls:
        raise ValueError(f"cache schedule has {len(s.depths)} entries, but this run makes {calls} "
                         "UNet calls; give one depth per call")
    if s.depths[0] != FULL:
        raise ValueError(f"the first call has nothing cached to reuse: its depth must be {FULL} "
                         "(full)")
    return list(s.depths)


@dataclass(frozen=True)
class CacheMode:
    """One way of placing full and cached calls: depths(schedule, calls) -> one depth per call;
    reads: the CacheSchedule fields it uses (the others must keep their defaults: sample.py
    refuses their flags)."""
    depths: Callable
    reads: tuple
    about: str


FORECAST_ORDERS = (0, 1, 2)
MODES = {
    "uniform": CacheMode(uniform_depths, ("interval", "depth", "order"),
                         "a full call every N calls (DeepCache)"),
    "nonuniform": CacheMode(nonuniform_depths, ("interval", "depth", "center", "power", "order"),
                            "as many full calls, densest around a centre call "
                            "(DeepCache's non-uniform)"),
    "dato": CacheMode(explicit_depths, ("depths", "order"),
                      "an explicit depth per call (DaTo, searched schedules)"),
}
