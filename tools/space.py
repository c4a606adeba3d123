"""The genome of search.py's schedule search, its constraints and NSGA-II's problem (pymoo): per UNet call a
cache depth gene and/or a pruning ratio gene, and optionally a guidance gene and a skip gene (the call plan,
accel/run.py), and one forecast-order gene for the run, repaired after every variation."""
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from accel import Acceleration, Guidance, Skip, find_preset
from cache import FULL, CacheSchedule
from prune import token_method
from tools.report import PRESETS_SHOWN

GUIDANCE_CHOICES = ("both", "reuse", "cond")   # ordered: neighbouring genes are similar calls
ORDERS = (0, 1, 2)   # a cached call's features: the newest (0), or a forecast, linear (1) or quadratic (2)


class Plan(NamedTuple):
    """A searched schedule: per UNet call its depth, ratio, guidance mode and whether it is skipped; the run's
    forecast order (cache/schedule.py)."""
    depths: list
    ratios: list
    modes: list
    skipped: list
    order: int = 0


@dataclass
class Space:
    """The genome of a schedule and its constraints: one depth gene and/or one ratio gene per UNet call, each an
    index into its list of choices (ordered, so neighbouring indices are similar schedules), then with `guidance`
    one mode gene per call (both, reuse, cond), with `skips` one skip gene per call and with `orders` one
    forecast-order gene (ORDERS) for the run.

    calls: UNet calls of the run. search: "cache", "prune" or "joint" (what the depth/ratio genes hold).
    depths, ratios: the choices of a gene (FULL and 0 are always among them). fixed_depths: the depths
    of a "prune" search (default: every call full); fixed_ratio: the ratio of a "cache" search.
    min_full: full calls at least; max_reuse: cached calls in a row at most. method: the token method.
    guidance: search each call's guidance mode. skips: search which calls are skipped (extrapolated).
    orders: search whether cached calls reuse or forecast their features.
    """
    calls: int
    search: str = "joint"
    depths: tuple = (0, 1, 2, FULL)
    ratios: tuple = (0, 0.3, 0.4, 0.5, 0.6, 0.7)
    fixed_depths: tuple | None = None
    fixed_ratio: float = 0.4
    min_full: int = 2
    max_reuse: int = 3
    method: str = "dato"
    guidance: bool = False
    skips: bool = False
    orders: bool = False

    def __post_init__(self):
        self.depths = tuple(sorted(set(self.depths) | {FULL}))
        self.ratios = tuple(sorted(set(self.ratios) | {0}))
        self.fixed_depths = tuple(self.fixed_depths) if self.fixed_depths is not None else (FULL,) * self.calls
        if len(self.fixed_depths) != self.calls:
            raise ValueError(f"--fixed-depths has {len(self.fixed_depths)} depths; this run makes {self.calls} "
                             "UNet calls")
        if not 1 <= self.min_full <= self.calls:
            raise ValueError(f"--min-full must be from 1 to {self.calls}, got {self.min_full}")
        if self.max_reuse < 0:
            raise ValueError(f"--max-reuse must be >= 0, got {self.max_reuse}")

    @property
    def searches_depths(self):
        return self.search in ("cache", "joint")

    @property
    def searches_ratios(self):
        return self.search in ("prune", "joint")

    @property
    def bounds(self):
        """Upper bound of each gene (the lower bounds are 0)."""
        return ([len(self.depths) - 1] * self.calls * self.searches_depths
                + [len(self.ratios) - 1] * self.calls * self.searches_ratios
                + [len(GUIDANCE_CHOICES) - 1] * self.calls * self.guidance + [1] * self.calls * self.skips
                + [len(ORDERS) - 1] * self.orders)

    def decode(self, genes):
        """The Plan of a genome."""
        genes, n = [int(g) for g in genes], self.calls
        parts = iter([genes[k:k + n] for k in range(0, len(genes), n)])
        depths = [self.depths[g] for g in next(parts)] if self.searches_depths else list(self.fixed_depths)
        ratios = [self.ratios[g] for g in next(parts)] if self.searches_ratios else [self.fixed_ratio] * n
        modes = [GUIDANCE_CHOICES[g] for g in next(parts)] if self.guidance else ["both"] * n
        skipped = [bool(g) for g in next(parts)] if self.skips else [False] * n
        order = ORDERS[next(parts)[0]] if self.orders else 0
        return Plan(depths, ratios, modes, skipped, order)

    def encode(self, plan):
        """The genome of a Plan; each depth and ratio is taken to the nearest choice."""
        nearest = lambda values, v: min(range(len(values)), key=lambda i: abs(values[i] - v))  # noqa: E731
        return ([nearest(self.depths, d) for d in plan.depths] * self.searches_depths
                + [nearest(self.ratios, r) for r in plan.ratios] * self.searches_ratios
                + [GUIDANCE_CHOICES.index(m) for m in plan.modes] * self.guidance
                + [int(s) for s in plan.skipped] * self.skips + [ORDERS.index(plan.order)] * self.orders)

    def repair(self, plan):
        """The constraints, kept by the smallest deterministic changes: call 0 full, guided and made; no skipped
        call before call 2 or right after another; every run of reuse-all calls longer than max_reuse broken by a
        shallowest non-reuse call; a full call in the middle of the longest stretch without one until there are
        min_full; a guided cached call after a one-branch call since the last full one reuses the difference
        instead; no ratio on reuse-all calls; a skipped call holds the plain genes (nothing of it is made); no
        forecast order without a cached call."""
        depths, ratios, modes, skipped = (list(part) for part in plan[:4])
        depths[0], modes[0] = FULL, "both"
        for i in range(self.calls):
            skipped[i] = skipped[i] and i >= 2 and not skipped[i - 1]
        shallowest = min((d for d in self.depths if d > 0), default=FULL)
        run = 0
        for i, d in enumerate(depths):
            if skipped[i]:   # nothing is made: it neither breaks nor extends a run of reuse-all calls
                continue
            run = run + 1 if d == 0 else 0
            if run > self.max_reuse:
                depths[i], run = shallowest, 0
        full = lambda: [i for i, d in enumerate(depths) if d == FULL and not skipped[i]]  # noqa: E731
        while len(full()) < self.min_full:
            ends = full() + [self.calls]
            gap, start = max((b - a, a) for a, b in zip(ends, ends[1:], strict=False))
            depths[start + gap // 2], skipped[start + gap // 2] = FULL, False
        features_guided = True
        for i in range(self.calls):
            if skipped[i]:
                depths[i], ratios[i], modes[i] = FULL, 0, "both"
                continue
            if depths[i] != FULL and modes[i] == "both" and not features_guided:
                modes[i] = "reuse"
            both = modes[i] == "both"
            features_guided = both if depths[i] == FULL else features_guided and both
        ratios = [0 if d == 0 else r for d, r in zip(depths, ratios, strict=True)]
        cached = any(d != FULL and not s for d, s in zip(depths, skipped, strict=True))
        return Plan(depths, ratios, modes, skipped, plan.order if cached else 0)

    def cheapest(self):
        """The schedule with the fewest MACs the constraints allow: every call reuse-all where it may be, the
        highest pruning ratio, one branch, and every other call skipped."""
        genes = ([0] * self.calls * self.searches_depths + [len(self.ratios) - 1] * self.calls * self.searches_ratios
                 + [GUIDANCE_CHOICES.index("cond")] * self.calls * self.guidance
                 + [i % 2 for i in range(self.calls)] * self.skips + [0] * self.orders)
        return self.repair(self.decode(genes))

    def acceleration(self, plan):
        depths, ratios, modes, skipped, order = plan
        cache = CacheSchedule("dato", depths=tuple(depths), order=order) if any(d != FULL for d in depths) else None
        prune = token_method(self.method, ratio=max(ratios), schedule=tuple(ratios)) if any(ratios) else None
        guidance = Guidance(modes=tuple(modes)) if any(m != "both" for m in modes) else None
        skip = Skip(tuple(i for i, s in enumerate(skipped) if s)) if any(skipped) else None
        return Acceleration(prune, cache, guidance=guidance, skip=skip)

    def key(self, plan):
        """The resume log's key of a repaired Plan (a search of depths and ratios only keeps its old keys)."""
        return ([plan.depths, plan.ratios] + ([plan.modes, plan.skipped] if self.guidance or self.skips else [])
                + ([plan.order] if self.orders else []))


def pymoo_problem(space, evaluate, min_mac_ratio=1.0):
    from pymoo.core.problem import Problem

    class ScheduleProblem(Problem):
        """A whole population at a time, so that its schedules can be evaluated in parallel. With a
        min_mac_ratio above 1, schedules that save fewer MACs break a constraint and are not rendered: pymoo
        ranks every feasible schedule above them, and them by how far they fall short."""
        def __init__(self):
            bounds = np.array(space.bounds)
            super().__init__(n_var=len(bounds), n_obj=2, n_ieq_constr=int(min_mac_ratio > 1),
                             xl=np.zeros_like(bounds), xu=bounds, vtype=int)

        def _evaluate(self, X, out, *args, **kwargs):
            schedules = [space.decode(x) for x in X]
            ratios = np.array([evaluate.mac_ratio(schedule) for schedule in schedules])
            feasible = ratios >= min_mac_ratio
            out["F"] = np.full((len(X), 2), np.inf)   # an infeasible schedule's objectives are never compared
            if feasible.any():
                records = evaluate([schedule for schedule, ok in zip(schedules, feasible, strict=True) if ok])
                out["F"][feasible] = [evaluate.objectives(r) for r in records]
            if self.n_ieq_constr:
                out["G"] = (min_mac_ratio - ratios)[:, None]
    return ScheduleProblem()


def pymoo_repair(space):
    from pymoo.core.repair import Repair

    class KeepConstraints(Repair):
        def _do(self, problem, X, **kwargs):
            return np.array([space.encode(space.repair(space.decode(np.rint(x)))) for x in X], dtype=float)
    return KeepConstraints()


def random_plan(space, rng):
    """A random schedule whose cheapness is itself drawn: with probability p (uniform per schedule) a call takes a
    cheaper choice than the plain one in each searched part, so a population spans light to heavy schedules
    (1.1x to 3x over the run, not only the cheap end)."""
    p, n = rng.uniform(0.1, 0.9), space.calls
    cheaper = lambda choices: [rng.choice(choices) if rng.random() < p else None for _ in range(n)]  # noqa: E731
    depths = [FULL if d is None else d for d in cheaper([d for d in space.depths if d != FULL])]
    ratios = [0 if r is None else r for r in cheaper([r for r in space.ratios if r])]
    modes = [m or "both" for m in cheaper(["reuse", "cond"])]
    skipped = [rng.random() < p / 3 for _ in range(n)]
    return Plan(depths, ratios, modes, skipped, rng.choice(ORDERS) if space.orders else 0)


def initial_population(space, size, rng, feasible=lambda plan: True, tries=100):
    """The known schedules that fit and are feasible once repaired (the deepcache and dato presets, the
    baseline), then random ones (random_plan), each redrawn up to `tries` times until it is feasible."""
    calls, known = space.calls, []
    plain = ["both"] * calls, [False] * calls
    for name in PRESETS_SHOWN:
        try:
            depths = find_preset(name).acceleration().depths(calls)
        except ValueError:
            continue
        known.append(space.encode(Plan(depths, [space.fixed_ratio if d else 0 for d in depths], *plain)))
    known.append(space.encode(Plan([FULL] * calls, [0] * calls, *plain)))
    rows = [row for row in known if feasible(space.repair(space.decode(row)))]
    while len(rows) < size:
        for _ in range(tries):
            plan = random_plan(space, rng)
            if feasible(space.repair(plan)):
                break
        rows.append(space.encode(plan))
    return np.array(rows[:size], dtype=float)
