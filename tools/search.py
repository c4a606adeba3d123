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
searches both; --guidance adds a guidance gene per call (both branches, the conditional one plus the last
guided difference, or the conditional one alone), --skips a skip gene (the call's estimate extrapolated) and
--orders one gene for the run's forecast order (cached calls reuse or extrapolate their features), the whole
call plan of accel/. Every candidate is repaired after crossover and mutation (and at initialisation): call 0
full, at least --min-full full calls, at most --max-reuse consecutive reuse-all calls, and no ratio on a
reuse-all call (it runs no transformer block). DaTo's released search kept none of this after its first
generation, rewarded slower runs, and its ratio genes had no effect (docs/methods.md, "Differences from the
official code").
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
import importlib.util
import json
import math
import os
import shlex
import time

import numpy as np

from accel import check_preset_fits, find_preset
from cache import FULL
from lab.features import SHIPPED as LAB_FEATURES_FILE
from lab.scenes import sample_captions
from model.hardware import check_device, resolve_dtype
from prune import METHODS as PRUNE_METHODS
from prune import CellMethod
from prune.tokens import max_ratio
from sampler import call_sigmas, unet_calls
from sampler.generate import Timer, check_size, generate
from tools.cli import (
    Parser,
    add_model_flags,
    add_sampling_flags,
    check_results_folder,
    claim_folder,
    load_model,
    parse_numbers,
    repeat_flags,
    resolve_run,
    run_tool,
    sampling,
    settings_record,
    write_json,
)
from tools.measure import run_macs
from tools.metrics import Scorer
from tools.report import PRESETS_SHOWN, non_dominated, report
from tools.results import read_log
from tools.shard import Shard, add_worker_flag, run_workers, wants_workers
from tools.space import Plan, Space, initial_population, pymoo_problem, pymoo_repair
from tools.specs import schedule_entry

QUALITIES = {"accuracy": 1, "psnr": 1, "fd_lab_vs_baseline": -1}   # +1: higher is better
COSTS = {"macs": "mac_ratio", "time": "speedup"}   # --cost -> the record's field; the objective is its inverse

RECORD = ("key", "depths", "ratios", "quality", "mac_ratio", "share")   # what a resumed search reads of a record
SCHEDULED = [name for name, cls in PRUNE_METHODS.items() if issubclass(cls, CellMethod)]   # per-call ratios


class Evaluator:
    """Renders the search prompts for a schedule and scores them; remembers every evaluation in
    DIR/evaluations.jsonl (the resume log), keyed by the decoded schedule."""

    def __init__(self, sd, args, space, prompts, scorer, log_path, shard):
        self.sd, self.args, self.space, self.prompts, self.scorer = sd, args, space, prompts, scorer
        self.log_path, self.shard, self.done, self.spent = log_path, shard, {}, 0.0
        fields = (*RECORD, *(["speedup"] if args.cost == "time" else []))
        for record in read_log(log_path, shard.rank == 0, fields):
            self.done[record["key"]] = record
            self.spent += record["share"]
        self.hw = tuple(side // sd.config.vae.factor for side in check_size(sd.config, sampling(args).size))
        self.base_macs = run_macs(sd.unet, None, space.calls, self.hw, matmuls=True)
        self.sigmas = call_sigmas(args.sampler, args.steps)   # each call's noise level: a forecast's time coordinate
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
        """[{"quality", "mac_ratio", ...}] of repaired schedules (tools.space.Plan), on every process. Those not
        in the log are evaluated, one per process at a time (schedule i by rank i % processes), and logged
        by rank 0 in the order given."""
        keys = [json.dumps(self.space.key(plan)) for plan in schedules]
        plans = dict(zip(keys, schedules, strict=True))
        todo = list(dict.fromkeys(key for key in keys if key not in self.done))
        if todo:
            if self.spent > 60 * self.args.budget_minutes:
                raise BudgetSpent
            if self.baseline_seconds is None and (self.args.quality != "accuracy" or self.args.cost == "time"):
                self.prepare_baseline()
            def work(i, _):
                return self.evaluate(plans[todo[i]])
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

    def mac_ratio(self, plan):
        """The baseline's UNet MACs over the schedule's (analytic: known before rendering)."""
        accel = self.space.acceleration(plan)
        return self.base_macs / run_macs(self.sd.unet, accel, self.space.calls, self.hw, matmuls=True,
                                         sigmas=self.sigmas)

    def evaluate(self, plan):
        start = time.perf_counter()
        images, unet_seconds = self.render(self.space.acceleration(plan))
        record = {"key": json.dumps(self.space.key(plan)), "depths": plan.depths, "ratios": plan.ratios,
                  **({"modes": plan.modes, "skipped": plan.skipped} if self.space.guidance or self.space.skips else {}),
                  **({"order": plan.order} if self.space.orders else {}),
                  "quality": self.score(images), "unet_seconds": unet_seconds, "mac_ratio": self.mac_ratio(plan)}
        if self.args.cost == "time":   # kept in the record: a resumed run replays the same objectives
            record["speedup"] = self.baseline_seconds / unet_seconds
        return {**record, "seconds": time.perf_counter() - start}


class BudgetSpent(Exception):
    """--budget-minutes of rendering are spent: the search stops at the last whole generation."""


def search(args, evaluate, space):
    """NSGA-II until --generations or the budget; -> the evaluated records of the final non-dominated set."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair

    rng = np.random.default_rng(args.seed)
    feasible = lambda plan: evaluate.mac_ratio(plan) >= args.min_mac_ratio   # noqa: E731
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


def write_pareto(path, records, space, args):
    points = [schedule_entry(space.acceleration(record_plan(r, space.calls)), args.sampler, args.steps,
                             about=f"search.py --search {args.search}: search-set {args.quality} "
                                   f"{r['quality']:.4f} at {r['mac_ratio']:.2f}x fewer MACs",
                             mac_ratio=r["mac_ratio"], search_quality=r["quality"],
                             **({"speedup": r["speedup"]} if "speedup" in r else {})) for r in records]
    settings = {k: getattr(args, k) for k in ("search", "quality", "cost", "n", "seed", "population", "generations",
                                              "method", "min_full", "max_reuse", "min_mac_ratio", "steps",
                                              "sampler", "guidance", "skips", "orders")}
    write_json(path, {"points": points, "search": settings})


def record_plan(record, calls):
    """The Plan of an evaluation record (a search of depths and ratios only logs no modes, skips or order)."""
    return Plan(record["depths"], record["ratios"], record.get("modes", ["both"] * calls),
                record.get("skipped", [False] * calls), record.get("order", 0))


def heldout_command(args, out, points):
    """evaluate.py on 256 held-out prompts: the baseline, the presets that fit the run, every point; the
    model and sampling flags of the search, so the held-out images are rendered as the searched ones."""
    fits = []
    for name in PRESETS_SHOWN:
        try:
            check_preset_fits(name, args.sampler, args.steps)
            fits.append(name)
        except ValueError:
            continue
    specs = ",".join(["baseline", *fits] + [f"{out}/pareto.json#{k}" for k in range(points)])
    return shlex.join(["python", "-m", "tools.evaluate", *repeat_flags(args), "--n", "256",
                       "--seed", str(args.heldout_seed), "--methods", specs, "--out", f"{out}/heldout"])


def search_space(args):
    """The Space of the flags, each list and the fixed schedule checked against the run, naming its flag."""
    calls = unet_calls(args.steps, args.sampler)
    depths, ratios = parse_numbers(args.depths, int, "--depths"), parse_numbers(args.ratios, float, "--ratios")
    if bad := [d for d in depths if not 0 <= d <= FULL]:
        raise ValueError(f"--depths {args.depths}: a depth must be in 0..{FULL} ({FULL} = full call), got {bad}")
    sx, sy = PRUNE_METHODS[args.method].sx, PRUNE_METHODS[args.method].sy
    if not 0 <= args.fixed_ratio <= max_ratio(sx, sy):
        raise ValueError(f"--fixed-ratio {args.fixed_ratio:g} must be in [0, {max_ratio(sx, sy):g}]")
    if args.heldout_seed < 0:
        raise ValueError(f"--heldout-seed must be >= 0 (evaluate.py's --seed), got {args.heldout_seed}")
    if bad := [r for r in ratios if not 0 <= r <= max_ratio(sx, sy)]:
        raise ValueError(f"--ratios {args.ratios}: a ratio must be in [0, {max_ratio(sx, sy):g}] (one base token per "
                         f"{sx}x{sy} cell stays), got {bad}")
    fixed = None
    if args.search == "prune":
        preset = find_preset(args.fixed_depths).acceleration()
        try:
            fixed = preset.depths(calls)
        except ValueError:
            raise ValueError(f"--fixed-depths {args.fixed_depths} is a schedule of another run; this one "
                             f"(--sampler {args.sampler} --steps {args.steps}) makes {calls} UNet calls: give a "
                             "schedule file of this run (a search's pareto.json#k) or a preset that fits it") from None
    return Space(calls, args.search, depths=depths, ratios=ratios, fixed_depths=fixed, fixed_ratio=args.fixed_ratio,
                 min_full=args.min_full, max_reuse=args.max_reuse, method=args.method, guidance=args.guidance,
                 skips=args.skips, orders=args.orders)


def run(args):
    resolve_run(args)
    if args.report:
        return report(args.out, args.report, args.ship)
    if args.ship:
        raise ValueError("--ship goes with --report HELDOUT_DIR (it ships the held-out Pareto set)")
    if importlib.util.find_spec("pymoo") is None:
        raise ValueError("search.py needs pymoo: pip install -r requirements-search.txt")
    if args.quality not in QUALITIES:
        raise ValueError(f"--quality must be one of {', '.join(QUALITIES)}")
    for flag, value, low in (("--n", args.n, 1), ("--population", args.population, 2),
                             ("--generations", args.generations, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.quality.startswith("fd") and args.n < 2:   # as evaluate.py refuses --n 1, before any rendering
        raise ValueError(f"--n {args.n}: --quality {args.quality} is a Fréchet distance between two sets of images "
                         "and needs at least 2 of each; use --n 2 or more")
    if not 1 <= args.min_mac_ratio < math.inf:
        raise ValueError(f"--min-mac-ratio must be a number >= 1 (1: every schedule), got {args.min_mac_ratio}")
    if not 0 < args.budget_minutes < math.inf:
        raise ValueError(f"--budget-minutes must be a number of minutes > 0, got {args.budget_minutes}")
    check_results_folder(args.out)
    space = search_space(args)
    prompts = sample_captions(args.n, seed=f"search/{args.seed}")
    sampling(args, seed=args.seed)   # the seed and the sampling flags, before any heavy work
    shard = Shard.start(args)
    device = shard.device(check_device(args.device))
    scorer = Scorer.open(prompts, baseline=args.quality != "accuracy", lab_features=LAB_FEATURES_FILE, device=device)
    if wants_workers(args):   # after the checks, so bad input is reported once, here
        return run_workers(run, args)
    dtype = resolve_dtype(args.dtype, device)
    sd = load_model(args, device, dtype)
    # what an evaluation depends on: a resumed search reuses the log's records only under the same settings
    settings = {**settings_record(args, sd, prompts, dtype), "quality": args.quality, "cost": args.cost,
                "method": args.method, **({"guidance": True} if args.guidance else {}),
                **({"skips": True} if args.skips else {})}
    evaluate = Evaluator(sd, args, space, prompts, scorer, os.path.join(args.out, "evaluations.jsonl"), shard)
    reach = evaluate.mac_ratio(space.cheapest())
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
          f"  {shlex.join(['python', '-m', 'tools.search', '--out', args.out, '--report', f'{args.out}/heldout'])}")
    return records




def parser():
    p = Parser(prog="python -m tools.search", description=__doc__)
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
    p.add_argument("--depths", default=f"0,1,2,{FULL}",
                   help=f"cache depths a call may take, {FULL} = full (0,1,2,{FULL})")
    p.add_argument("--ratios", default="0,0.3,0.4,0.5,0.6,0.7",
                   help="pruning ratios a call may take (0,0.3,0.4,0.5,0.6,0.7)")
    p.add_argument("--method", choices=SCHEDULED, default="dato", help="token pruning method (dato)")
    p.add_argument("--fixed-ratio", type=float, default=0.4, help="--search cache: every call's ratio (0.4)")
    p.add_argument("--fixed-depths", default="dato-fixed", help="--search prune: depths of this preset/file")
    p.add_argument("--min-full", type=int, default=2, help="at least this many full calls (2)")
    p.add_argument("--max-reuse", type=int, default=3, help="at most this many reuse-all calls in a row (3)")
    p.add_argument("--guidance", action="store_true", help="search each call's guidance too: both branches, the "
                   "conditional one plus the last guided difference (reuse), or the conditional one alone (cond)")
    p.add_argument("--skips", action="store_true", help="search which calls are skipped too (their estimate "
                   "extrapolated from the last two; never two in a row)")
    p.add_argument("--orders", action="store_true", help="search the forecast order too, one gene for the run: "
                   "cached calls reuse the newest features (0) or extrapolate them in log-SNR, linearly (1) or "
                   "quadratically (2)")
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
    return run_tool(parser(), run, argv, interrupted="interrupted; rerun the same command to continue the search "
                    "(evaluations.jsonl keeps every finished evaluation)")


if __name__ == "__main__":
    main()
