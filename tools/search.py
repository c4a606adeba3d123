"""DaTo's schedule search, working: NSGA-II (pymoo) over per-UNet-call cache depths and pruning ratios,
with quality measured on the generated images and cost in analytic UNet MACs (or measured UNet time).

    python -m tools.search --ckpt lab/lab-sd.safetensors --out runs/search            # search (resumable)
    python -m tools.evaluate ... --methods baseline,...,runs/search/pareto.json#0,...  # held-out (printed)
    python -m tools.search --out runs/search --report runs/search/heldout            # held-out figures + pareto.png
    python -m tools.search --out runs/search --report runs/search/heldout --ship lab/schedules/plms50.json

What is searched, per UNet call of the run (any sampler and step count): a cache depth (--depths; FULL = 12
is a full call, 0 reuses everything) and a pruning ratio (--ratios, 0 = off) of --method's token pruning.
--search cache fixes the ratio (--fixed-ratio, DaTo's 0.4), --search prune fixes the depths
(--fixed-depths, a preset or schedule file; DaTo's ratio search used dato-fixed's), --search joint
searches both. Every candidate is repaired after crossover and mutation (and at initialisation): call 0
full, at least --min-full full calls, at most --max-reuse consecutive reuse-all calls, and no ratio on a
reuse-all call (it runs no transformer block). DaTo's released search kept none of this after its first
generation, rewarded slower runs, and its ratio genes had no effect (shared/reference/methods.md §5.4).
--min-mac-ratio R spends the search on the fast end: a schedule that saves fewer MACs breaks a constraint
and is never rendered (MACs are analytic), and the initial population is drawn among those that do.

Objectives (both minimised by NSGA-II): quality on the search prompts (--quality: the lab checker's
accuracy, PSNR against the baseline's images, or lab FD against them) and cost = the method's UNet MACs
over the baseline's (attention matmuls included; deterministic, the code bench.py and evaluate.py use),
or with --cost time its UNet seconds over the baseline's, measured as it renders (noisy).
Each candidate renders --n search prompts (lab captions drawn with --seed, never evaluate.py's default
seed 0, so the held-out figures are on unseen prompts and noise).

Parallel: --workers K (or torchrun --nproc-per-node K) evaluates each generation's new schedules K at a
time, schedule i by process i % K, with the same results and log as one process.

Resume: every evaluation is appended to DIR/evaluations.jsonl. pymoo is seeded, so a rerun of the same
command replays the search, taking the stored evaluations instead of rendering, and continues where the
last run stopped; --budget-minutes bounds the rendering time of all runs together (wall-clock: an
evaluation counts its seconds / processes).

Output: DIR/pareto.json, the non-dominated schedules as a schedule file (FILE.json#k is point k, accepted
by sample.py --preset, evaluate.py and bench.py --methods) with their MAC ratio and search-set quality;
--report adds the held-out figures of evaluate.py's results.json and draws DIR/pareto.png; --ship FILE
writes the points that stay non-dominated on the held-out images (accuracy against MAC ratio) to FILE.
"""
import argparse
import importlib.util
import json
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from accel import Acceleration, check_preset_fits, find_preset, run_macs, schedule_entry
from cache import FULL, CacheSchedule
from lab.scenes import sample_captions
from model.hardware import check_device, resolve_dtype
from prune import METHODS as PRUNE_METHODS
from prune import CellMethod, token_method
from sampler import unet_calls
from sampler.generate import Timer, check_seeds, check_size, generate
from tools.cli import (
    add_model_flags,
    add_sampling_flags,
    claim_folder,
    load_model,
    parse_numbers,
    run_tool,
    sampling,
    settings_record,
)
from tools.metrics import Scorer, markdown
from tools.shard import Shard, add_worker_flag, run_workers, wants_workers

QUALITIES = {"accuracy": 1, "psnr": 1, "fd_lab_vs_baseline": -1}   # +1: higher is better
COSTS = {"macs": "mac_ratio", "time": "speedup"}   # --cost -> the record's field; the objective is its inverse
PRESETS_SHOWN = ("deepcache-n3", "deepcache-n5", "dato-fixed", "dato-coco")   # seeded, and compared in --report

SCHEDULED = [name for name, cls in PRUNE_METHODS.items() if issubclass(cls, CellMethod)]   # per-call ratios


class Space:
    """The genome of a schedule and its constraints: one depth gene and/or one ratio gene per UNet call,
    each an index into its list of choices (ordered, so neighbouring indices are similar schedules)."""

    def __init__(self, calls, search="joint", depths=(0, 1, 2, FULL), ratios=(0, 0.3, 0.4, 0.5, 0.6, 0.7),
                 fixed_depths=None, fixed_ratio=0.4, min_full=2, max_reuse=3, method="dato"):
        self.calls, self.search, self.method = calls, search, method
        self.depths = tuple(sorted(set(depths) | {FULL}))
        self.ratios = tuple(sorted(set(ratios) | {0}))
        self.fixed_depths = tuple(fixed_depths) if fixed_depths is not None else (FULL,) * calls
        self.fixed_ratio, self.min_full, self.max_reuse = fixed_ratio, min_full, max_reuse
        if len(self.fixed_depths) != calls:
            raise ValueError(f"--fixed-depths has {len(self.fixed_depths)} depths; this run makes {calls} UNet calls")
        if not 1 <= min_full <= calls:
            raise ValueError(f"--min-full must be from 1 to {calls}, got {min_full}")
        if max_reuse < 0:
            raise ValueError(f"--max-reuse must be >= 0, got {max_reuse}")

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


class Evaluator:
    """Renders the search prompts for a schedule and scores them; remembers every evaluation in
    DIR/evaluations.jsonl (the resume log), keyed by the decoded schedule."""

    def __init__(self, sd, args, space, prompts, scorer, log_path, shard):
        self.sd, self.args, self.space, self.prompts, self.scorer = sd, args, space, prompts, scorer
        self.log_path, self.shard, self.done, self.spent = log_path, shard, {}, 0.0
        if os.path.exists(log_path):
            with open(log_path) as f:
                for line in f:
                    if line.strip():
                        record = json.loads(line)
                        self.done[record["key"]] = record
                        self.spent += record["share"]
        self.hw = tuple(side // sd.config.vae.factor for side in check_size(sd, sampling(args).size))
        self.base_macs = run_macs(sd.unet, None, space.calls, self.hw, matmuls=True)
        self.baseline = self.baseline_features = self.baseline_seconds = None

    def render(self, accel):
        """The search prompts' images under `accel` and the UNet seconds per image they took."""
        timer = Timer(self.sd.device)
        images = generate(self.sd, self.prompts, sampling(self.args, seed=self.args.seed, accel=accel,
                                                          batch_size=self.args.batch_size), timer=timer)
        return images, timer.totals["unet"] / len(images)

    def objectives(self, record):
        """What NSGA-II minimises: minus the quality, and the cost relative to the baseline."""
        return [-record["quality"], 1 / record[COSTS[self.args.cost]]]

    def batches(self, images):
        size = self.args.batch_size
        return [(a, images[a:a + size]) for a in range(0, len(images), size)]

    def score(self, images):
        """The search's quality of a set of images, higher is better (a distance counts negatively)."""
        size = self.args.batch_size
        parts = [self.scorer.score(batch, self.prompts[a:a + size],
                                   self.baseline[a:a + size] if self.baseline else None)
                 for a, batch in self.batches(images)]
        entry = self.scorer.summarize(parts, self.prompts, baseline=self.baseline_features)
        return QUALITIES[self.args.quality] * entry[self.args.quality]

    def __call__(self, schedules):
        """[{"quality", "mac_ratio", ...}] of repaired (depths, ratios) schedules, on every process. Those not
        in the log are evaluated, one per process at a time (schedule i by rank i % processes), and logged
        by rank 0 in the order given."""
        keys = [json.dumps([depths, ratios]) for depths, ratios in schedules]
        todo = list(dict.fromkeys(key for key in keys if key not in self.done))
        if todo:
            if self.spent > 60 * self.args.budget_minutes:
                raise BudgetSpent
            if self.baseline_seconds is None and (self.args.quality != "accuracy" or self.args.cost == "time"):
                self.prepare_baseline()
            def work(i, _):
                return self.evaluate(*json.loads(todo[i]))
            records = self.shard.share(self.shard.batches(len(todo), 1, work))
            for record in records:
                record["share"] = record["seconds"] / self.shard.world   # of the search's wall-clock
                self.done[record["key"]], self.spent = record, self.spent + record["share"]
                if self.shard.rank == 0:
                    with open(self.log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    speed = f"  speed-up {record['speedup']:.2f}x" if "speedup" in record else ""
                    print(f"quality {record['quality']:.4f}  MAC ratio {record['mac_ratio']:.2f}x{speed}  "
                          f"({record['seconds']:.0f}s, {len(self.done)} evaluated, {self.spent / 60:.1f} of "
                          f"{self.args.budget_minutes} min)", flush=True)
        return [self.done[key] for key in keys]

    def prepare_baseline(self):
        """The baseline's images and features (a quality against them) and UNet time (--cost time), rendered
        by every process (the same images, and a time measured under the same load as its evaluations)."""
        images, self.baseline_seconds = self.render(None)
        if self.args.quality != "accuracy":
            self.baseline = images
            features = [self.scorer.features_of(batch) for _, batch in self.batches(images)]
            self.baseline_features = {name: [f[name] for f in features] for name in self.scorer.features}

    def mac_ratio(self, depths, ratios):
        """The baseline's UNet MACs over the schedule's (analytic: known before rendering)."""
        accel = self.space.acceleration(depths, ratios)
        return self.base_macs / run_macs(self.sd.unet, accel, self.space.calls, self.hw, matmuls=True)

    def evaluate(self, depths, ratios):
        start = time.perf_counter()
        images, unet_seconds = self.render(self.space.acceleration(depths, ratios))
        record = {"key": json.dumps([depths, ratios]), "depths": depths, "ratios": ratios,
                  "quality": self.score(images), "unet_seconds": unet_seconds,
                  "mac_ratio": self.mac_ratio(depths, ratios)}
        if self.args.cost == "time":   # kept in the record: a resumed run replays the same objectives
            record["speedup"] = self.baseline_seconds / unet_seconds
        return {**record, "seconds": time.perf_counter() - start}


class BudgetSpent(Exception):
    """--budget-minutes of rendering are spent: the search stops at the last whole generation."""


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


def search(args, evaluate, space):
    """NSGA-II until --generations or the budget; -> the evaluated records of the final non-dominated set."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair

    rng = np.random.default_rng(args.seed)
    feasible = lambda depths, ratios: evaluate.mac_ratio(depths, ratios) >= args.min_mac_ratio   # noqa: E731
    algorithm = NSGA2(pop_size=args.population, sampling=initial_population(space, args.population, rng, feasible),
                      crossover=SBX(prob=0.9, eta=10, vtype=float, repair=RoundingRepair()),
                      mutation=PM(prob=1.0, eta=10, vtype=float, repair=RoundingRepair()),
                      repair=pymoo_repair(space), eliminate_duplicates=True)
    algorithm.setup(pymoo_problem(space, evaluate, args.min_mac_ratio), termination=("n_gen", args.generations),
                    seed=args.seed, verbose=False)
    try:
        while algorithm.has_next():
            algorithm.next()
            if evaluate.shard.rank == 0:
                print(f"generation {algorithm.n_gen - 1} of {args.generations} done", flush=True)
    except BudgetSpent:
        if evaluate.shard.rank == 0:
            print(f"--budget-minutes {args.budget_minutes} spent: stopping at generation {algorithm.n_gen - 1}")
    records = [r for r in evaluate.done.values() if r["mac_ratio"] >= args.min_mac_ratio]
    front = non_dominated([evaluate.objectives(r) for r in records])
    return sorted((records[i] for i in front), key=lambda r: r["mac_ratio"])


def non_dominated(scores):
    """Indices of the rows of `scores` (objectives, all minimised) that no other row dominates."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
    return NonDominatedSorting().do(np.array(scores, dtype=float), only_non_dominated_front=True)


def write_pareto(path, records, space, args):
    points = [schedule_entry(space.acceleration(r["depths"], r["ratios"]), args.sampler, args.steps,
                             about=f"search.py --search {args.search}: search-set {args.quality} "
                                   f"{r['quality']:.4f} at {r['mac_ratio']:.2f}x fewer MACs",
                             mac_ratio=r["mac_ratio"], search_quality=r["quality"],
                             **({"speedup": r["speedup"]} if "speedup" in r else {})) for r in records]
    settings = {k: getattr(args, k) for k in ("search", "quality", "cost", "n", "seed", "population", "generations",
                                              "method", "min_full", "max_reuse", "min_mac_ratio", "steps",
                                              "sampler")}
    with open(path, "w") as f:
        json.dump({"points": points, "search": settings}, f, indent=1)


def report(out, heldout, ship=None):
    """Held-out figures (evaluate.py's results.json in `heldout`) into pareto.json, and pareto.png; with
    `ship`, the held-out Pareto set written there as a schedule file."""
    if ship and os.path.exists(ship):
        raise ValueError(f"--ship {ship} exists; remove it or choose another file (it is not overwritten)")
    path = os.path.join(out, "pareto.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: run the search first (python -m tools.search --out {out} ...)")
    results_path = os.path.join(heldout, "results.json")
    if not os.path.isfile(results_path):
        raise ValueError(f"{results_path} does not exist: run the evaluate.py command the search printed")
    with open(path) as f:
        pareto = json.load(f)
    with open(results_path) as f:
        results = json.load(f)["methods"]
    for k, point in enumerate(pareto["points"]):
        point["heldout"] = results.get(f"{path}#{k}")   # evaluate.py's whole entry (None: not evaluated)
    with open(path, "w") as f:
        json.dump(pareto, f, indent=1)
    base = results.get("baseline")
    if base is None or "accuracy" not in base:
        if ship:
            raise ValueError("--ship needs the held-out accuracy: evaluate the baseline on lab captions")
        print(f"held-out figures added to {path}; pareto.png needs the baseline and lab captions (accuracy)")
        return
    measures = accuracy_measures(base)
    for k, p in enumerate(pareto["points"]):
        if p["heldout"]:
            print(f"#{k}: held-out " + ", ".join(f"{label} {value(p['heldout']):.1%}" for label, value in measures)
                  + f" at {p['heldout']['mac_ratio']:.2f}x")
    held = [p["heldout"] for p in pareto["points"] if p["heldout"]]
    highest = lambda entries: f"{max(e['mac_ratio'] for e in entries):.2f}x" if entries else "none"   # noqa: E731
    for label, value in measures:
        floor = value(base) - 0.01
        print(f"highest MAC ratio within 1 point of the baseline's {label} ({value(base):.1%}): searched "
              f"{highest([e for e in held if value(e) >= floor])}, presets "
              f"{highest([results[n] for n in PRESETS_SHOWN if n in results and value(results[n]) >= floor])}")
        for name in (n for n in PRESETS_SHOWN if n in results):   # the search against each preset, at its cost
            preset = results[name]
            best = max((e for e in held if e["mac_ratio"] >= preset["mac_ratio"]), key=value, default=None)
            print(f"  at >= {name}'s {preset['mac_ratio']:.2f}x: {name} {value(preset):.1%}, the most accurate "
                  f"searched point " + (f"{value(best):.1%} at {best['mac_ratio']:.2f}x" if best else "none"))
    draw_pareto(pareto, results, *measures[-1], os.path.join(out, "pareto.png"))
    if ship:
        shipped = heldout_front(pareto["points"], measures[-1][1])
        os.makedirs(os.path.dirname(os.path.abspath(ship)), exist_ok=True)
        with open(ship, "w") as f:
            json.dump({"points": shipped, "search": pareto["search"]}, f, indent=1)
        shown = {n: results[n] for n in ("baseline", *PRESETS_SHOWN) if n in results}
        print(f"{len(shipped)} held-out non-dominated schedules in {ship}:\n" + markdown(
            {**shown, **{f"{ship}#{k}": p["heldout"] for k, p in enumerate(shipped)}}))


def heldout_front(points, value):
    """The points with held-out figures that no other one beats in both `value` and MAC ratio."""
    held = [p for p in points if p["heldout"]]
    front = non_dominated([[-value(p["heldout"]), -p["heldout"]["mac_ratio"]] for p in held])
    return [held[i] for i in sorted(front)]


def accuracy_measures(baseline):
    """[(label, value of an evaluate.py entry)] of the held-out accuracies reported: the overall one and,
    on lab captions, the one-object accuracy (the figure that means something while pairs are near chance)."""
    measures = [("accuracy", lambda entry: entry["accuracy"])]
    if "single" in baseline.get("by_kind", {}):
        measures.append(("one-object accuracy", lambda entry: entry["by_kind"]["single"]["accuracy"]))
    return measures


def draw_pareto(pareto, results, label, value, path, width=560, height=372):
    """Held-out `label` against MAC ratio: the searched points (red), the baseline and presets (blue)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 50, width - 20, 15, height - 47
    points = [(p["heldout"]["mac_ratio"], value(p["heldout"]), f"#{k}", (200, 60, 40))
              for k, p in enumerate(pareto["points"]) if p.get("heldout")]
    points += [(results[n]["mac_ratio"], value(results[n]), n, (40, 80, 200))
               for n in ("baseline", *PRESETS_SHOWN) if n in results]
    x_max = max([p[0] for p in points] + [2]) * 1.1
    y_min = min([p[1] for p in points] + [0.9]) - 0.05

    def xy(x, y):
        return left + (x - 1) / (x_max - 1) * (right - left), bottom - (y - y_min) / (1 - y_min) * (bottom - top)
    draw.line((left, top, left, bottom, right, bottom), fill="black")
    for tick in range(1, int(x_max) + 1):
        draw.text((xy(tick, y_min)[0] - 3, bottom + 2), f"{tick}x", fill="black")
    draw.text((right - 190, bottom + 18), "MAC ratio (baseline / schedule)", fill="black")
    draw.text((left, height - 13), f"held-out {label} (red: searched, blue: presets)", fill="black")
    draw.text((4, top), "1", fill="black")
    draw.text((4, bottom - 10), f"{y_min:.2f}", fill="black")
    for x, y, text, color in points:
        px, py = xy(x, y)
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
        draw.text((px + 5, py - 6), text, fill="black")
    image.save(path)


def heldout_command(args, out, points):
    """evaluate.py on 256 held-out prompts: the baseline, the presets that fit the run, every point."""
    fits = []
    for name in PRESETS_SHOWN:
        try:
            check_preset_fits(name, args.sampler, args.steps)
            fits.append(name)
        except ValueError:
            continue
    specs = ",".join(["baseline", *fits] + [f"{out}/pareto.json#{k}" for k in range(points)])
    model = f"--ckpt {args.ckpt}" if args.ckpt else f"--random-weights {args.random_weights}"
    return (f"python -m tools.evaluate {model} --steps {args.steps} --sampler {args.sampler} --n 256 "
            f"--seed {args.heldout_seed} --methods {specs} --out {out}/heldout")


def run(args):
    if args.report:
        return report(args.out, args.report, args.ship)
    if args.ship:
        raise ValueError("--ship goes with --report HELDOUT_DIR (it ships the held-out Pareto set)")
    if importlib.util.find_spec("pymoo") is None:
        raise ValueError("search.py needs pymoo: pip install -r requirements-search.txt")
    if args.quality not in QUALITIES:
        raise ValueError(f"--quality must be one of {', '.join(QUALITIES)}")
    if args.n < 1 or args.population < 2 or args.generations < 1 or args.min_mac_ratio < 1:
        raise ValueError("--n must be >= 1, --population >= 2, --generations >= 1 and --min-mac-ratio >= 1")
    calls = unet_calls(args.steps, args.sampler)
    fixed = find_preset(args.fixed_depths).acceleration().depths(calls) if args.search == "prune" else None
    space = Space(calls, args.search, depths=args.depths, ratios=args.ratios, fixed_depths=fixed,
                  fixed_ratio=args.fixed_ratio, min_full=args.min_full, max_reuse=args.max_reuse, method=args.method)
    prompts = sample_captions(args.n, seed=f"search/{args.seed}")
    check_seeds(args.seed, len(prompts))
    shard = Shard.start(args)
    device = shard.device(check_device(args.device))
    scorer = Scorer.open(prompts, baseline=args.quality != "accuracy", lab_features=LAB_FEATURES, device=device)
    if wants_workers(args):   # after the checks, so bad input is reported once, here
        return run_workers(run, args)
    dtype = resolve_dtype(args.dtype, device)
    sd = load_model(args, device, dtype)
    # what an evaluation depends on: a resumed search reuses the log's records only under the same settings
    settings = {**settings_record(args, sd, prompts, dtype), "quality": args.quality, "cost": args.cost,
                "method": args.method}
    evaluate = Evaluator(sd, args, space, prompts, scorer, os.path.join(args.out, "evaluations.jsonl"), shard)
    reach = evaluate.mac_ratio(*space.cheapest())
    if args.min_mac_ratio > reach:
        raise ValueError(f"--min-mac-ratio {args.min_mac_ratio:g} is out of reach: the cheapest schedule these "
                         f"constraints allow saves {reach:.2f}x; lower it, or relax --max-reuse / --min-full")
    shard.on_first(lambda: claim_folder(args.out, settings, "evaluations"))
    records = search(args, evaluate, space)
    if shard.rank != 0:
        return None
    write_pareto(os.path.join(args.out, "pareto.json"), records, space, args)
    print(f"{len(records)} non-dominated schedules in {args.out}/pareto.json. Held-out figures:\n  "
          f"{heldout_command(args, args.out, len(records))}\n"
          f"  python -m tools.search --out {args.out} --report {args.out}/heldout")
    return records


LAB_FEATURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lab", "lab-features.safetensors")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: evaluations.jsonl (the resume log), pareto.json")
    p.add_argument("--search", choices=("cache", "prune", "joint"), default="joint",
                   help="what is searched per call: cache depths, pruning ratios, or both (joint)")
    p.add_argument("--quality", default="accuracy", help=f"search objective: {', '.join(QUALITIES)} (accuracy)")
    p.add_argument("--cost", choices=list(COSTS), default="macs",
                   help="cost objective: analytic UNet MACs (deterministic), or measured UNet time, which is noisy: "
                        "use one process on an otherwise idle machine (macs)")
    p.add_argument("--n", type=int, default=32, help="search prompts, lab captions (32)")
    p.add_argument("--seed", type=int, default=1, help="search prompts and noise, and pymoo's seed (1)")
    p.add_argument("--heldout-seed", type=int, default=0, help="evaluate.py's seed for the held-out figures (0)")
    p.add_argument("--batch-size", type=int, default=16, help="images per sampler batch (16)")
    p.add_argument("--population", type=int, default=16, help="NSGA-II population (16)")
    p.add_argument("--generations", type=int, default=12, help="NSGA-II generations (12)")
    p.add_argument("--budget-minutes", type=float, default=60, help="rendering minutes, all runs together (60)")
    p.add_argument("--depths", type=lambda text: parse_numbers(text, int, "--depths"), default=(0, 1, 2, FULL),
                   help=f"cache depths a call may take, {FULL} = full (0,1,2,{FULL})")
    p.add_argument("--ratios", type=lambda text: parse_numbers(text, float, "--ratios"),
                   default=(0, 0.3, 0.4, 0.5, 0.6, 0.7),
                   help="pruning ratios a call may take (0,0.3,0.4,0.5,0.6,0.7)")
    p.add_argument("--method", choices=SCHEDULED, default="dato", help="token pruning method (dato)")
    p.add_argument("--fixed-ratio", type=float, default=0.4, help="--search cache: every call's ratio (0.4)")
    p.add_argument("--fixed-depths", default="dato-fixed", help="--search prune: depths of this preset/file")
    p.add_argument("--min-full", type=int, default=2, help="at least this many full calls (2)")
    p.add_argument("--max-reuse", type=int, default=3, help="at most this many reuse-all calls in a row (3)")
    p.add_argument("--min-mac-ratio", type=float, default=1.0,
                   help="search only schedules with at least this MAC ratio; the others are not rendered (1: all)")
    p.add_argument("--report", metavar="HELDOUT_DIR", help="add evaluate.py's held-out results to pareto.json")
    p.add_argument("--ship", metavar="FILE", help="with --report: write the held-out Pareto set (one-object accuracy "
                                                  "on lab captions, else accuracy, against MAC ratio) to FILE")
    add_worker_flag(p)
    add_sampling_flags(p)
    add_model_flags(p)
    return p


def main(argv=None):
    return run_tool(parser(), run, argv)


if __name__ == "__main__":
    main()
