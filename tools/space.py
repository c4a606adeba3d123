"""The genome of search.py's schedule search, its constraints and NSGA-II's problem (pymoo): one cache
depth gene and/or one pruning ratio gene per UNet call, repaired after every variation."""
from dataclasses import dataclass

import numpy as np

from accel import Acceleration, find_preset
from cache import FULL, CacheSchedule
from prune import token_method
from tools.report import PRESETS_SHOWN


@dataclass
class Space:
    """The genome of a schedule and its constraints: one depth gene and/or one ratio gene per UNet call,
    each an index into its list of choices (ordered, so neighbouring indices are similar schedules).

    calls: UNet calls of the run. search: "cache", "prune" or "joint" (what the genes hold).
    depths, ratios: the choices of a gene (FULL and 0 are always among them). fixed_depths: the depths
    of a "prune" search (default: every call full); fixed_ratio: the ratio of a "cache" search.
    min_full: full calls at least; max_reuse: cached calls in a row at most. method: the token method.
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
                + [len(self.ratios) - 1] * self.calls * self.searches_ratios)

    def decode(self, genes):
        """(depths, ratios) per UNet call of a genome."""
        genes = [int(g) for g in genes]
        depths = [self.depths[g] for g in genes[:self.calls]] if self.searches_depths else list(self.fixed_depths)
        ratios = [self.ratios[g] for g in genes[-self.calls:]] if self.searches_ratios else \
            [self.fixed_ratio] * self.calls
        return depths, ratios

    def encode(self, depths, ratios):
        """The genome of (depths, ratios); each value is taken to the nearest choice."""
        nearest = lambda values, v: min(range(len(values)), key=lambda i: abs(values[i] - v))  # noqa: E731
        genes = [nearest(self.depths, d) for d in depths] * self.searches_depths
        return genes + [nearest(self.ratios, r) for r in ratios] * self.searches_ratios

    def repair(self, depths, ratios):
        """The constraints, kept by the smallest deterministic changes: call 0 full; every run of reuse-all
        calls longer than max_reuse broken by a shallowest non-reuse call; a full call in the middle of the
        longest stretch without one until there are min_full; no ratio on reuse-all calls."""
        depths, ratios = list(depths), list(ratios)
        depths[0] = FULL
        shallowest = min((d for d in self.depths if d > 0), default=FULL)
        run = 0
        for i, d in enumerate(depths):
            run = run + 1 if d == 0 else 0
            if run > self.max_reuse:
                depths[i], run = shallowest, 0
        while depths.count(FULL) < self.min_full:
            full = [i for i, d in enumerate(depths) if d == FULL] + [self.calls]
            gap, start = max((b - a, a) for a, b in zip(full, full[1:], strict=False))
            depths[start + gap // 2] = FULL
        ratios = [0 if d == 0 else r for d, r in zip(depths, ratios, strict=True)]
        return depths, ratios

    def cheapest(self):
        """The schedule with the fewest MACs the constraints allow: every call reuse-all where it may be, and the
        highest pruning ratio."""
        genes = [0] * self.calls * self.searches_depths + [len(self.ratios) - 1] * self.calls * self.searches_ratios
        return self.repair(*self.decode(genes))

    def acceleration(self, depths, ratios):
        cache = CacheSchedule("dato", depths=tuple(depths)) if any(d != FULL for d in depths) else None
        prune = token_method(self.method, ratio=max(ratios), schedule=tuple(ratios)) if any(ratios) else None
        return Acceleration(prune, cache)


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
            ratios = np.array([evaluate.mac_ratio(*schedule) for schedule in schedules])
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
            return np.array([space.encode(*space.repair(*space.decode(np.rint(x)))) for x in X], dtype=float)
    return KeepConstraints()


def initial_population(space, size, rng, feasible=lambda depths, ratios: True, tries=100):
    """The known schedules that fit and are feasible once repaired (the deepcache and dato presets, the
    baseline), then random ones whose depths lean to the shallow end (most good schedules are mostly cached),
    each redrawn up to `tries` times until it is feasible."""
    calls, known = space.calls, []
    for name in PRESETS_SHOWN:
        try:
            depths = find_preset(name).acceleration().depths(calls)
        except ValueError:
            continue
        known.append(space.encode(depths, [space.fixed_ratio if d else 0 for d in depths]))
    known.append(space.encode([FULL] * calls, [0] * calls))
    rows = [row for row in known if feasible(*space.repair(*space.decode(row)))]
    while len(rows) < size:
        for _ in range(tries):
            depths = [space.depths[min(int(rng.exponential(1.0)), len(space.depths) - 1)] for _ in range(calls)]
            ratios = [rng.choice(space.ratios) for _ in range(calls)]
            if feasible(*space.repair(depths, ratios)):
                break
        rows.append(space.encode(depths, ratios))
    return np.array(rows[:size], dtype=float)


