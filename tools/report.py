"""search.py's report: the held-out figures of a search's Pareto points (evaluate.py's results.json)
beside the baseline and the presets, its picture, and the held-out Pareto set shipped as a schedule file.

    python -m tools.search --out runs/search --report runs/search/heldout --ship lab/schedules/plms50.json
"""
import importlib.util
import os

import numpy as np

from tools.cli import read_json, write_json
from tools.metrics import markdown
from tools.plots import draw_pareto
from tools.results import check_paths, is_number

PARETO_FIX = "run the search again with the same --out to rewrite it"
RESULTS_FIX = "rerun the evaluate.py command the search printed"
PRESETS_SHOWN = ("deepcache-n3", "deepcache-n5", "dato-fixed", "dato-coco")   # seeded, and compared in --report


def non_dominated(scores):
    """Indices of the rows of `scores` (objectives, all minimised) that no other row dominates."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
    return NonDominatedSorting().do(np.array(scores, dtype=float), only_non_dominated_front=True)


def report(out, heldout, ship=None):
    """Held-out figures (evaluate.py's results.json in `heldout`) into pareto.json, and pareto.png; with
    `ship`, the held-out Pareto set written there as a schedule file."""
    path, pareto, results, found = read_report(out, heldout, ship)
    base = results.get("baseline")
    lab = base is not None and "accuracy" in base
    measures = accuracy_measures(base) if lab else []
    reported = {**{f"{path}#{k}": entry for k, entry in found.items()}, **shown_entries(results)}
    check_entries(os.path.join(heldout, "results.json"), reported, measures)
    if ship and not lab:
        raise ValueError("--ship needs the held-out accuracy: evaluate the baseline on lab captions")
    for k, point in enumerate(pareto["points"]):
        point["heldout"] = found.get(k)   # evaluate.py's whole entry (None: not evaluated in this folder)
    write_json(path, pareto)
    if not lab:
        print(f"held-out figures added to {path}; pareto.png needs the baseline and lab captions (accuracy)")
        return
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
    draw_pareto(pareto, results, PRESETS_SHOWN, *measures[-1], os.path.join(out, "pareto.png"))
    if ship:
        shipped = heldout_front(pareto["points"], measures[-1][1])
        os.makedirs(os.path.dirname(os.path.abspath(ship)), exist_ok=True)
        write_json(ship, {"points": shipped, "search": pareto["search"]})
        shown = {n: results[n] for n in ("baseline", *PRESETS_SHOWN) if n in results}
        print(f"{len(shipped)} held-out non-dominated schedules in {ship}:\n" + markdown(
            {**shown, **{f"{ship}#{k}": p["heldout"] for k, p in enumerate(shipped)}}))


def read_report(out, heldout, ship):
    """(pareto.json's path, its content, the held-out results.json's methods, {k: the entry of point k}),
    each file checked, and --ship, before anything is written."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--report draws pareto.png with matplotlib: pip install -r requirements-eval.txt")
    if os.path.isfile(heldout):
        raise ValueError(f"--report {heldout} is a file: give the held-out folder (evaluate.py's --out)")
    if ship:
        check_ship(ship)
    path = os.path.join(out, "pareto.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: run the search first (python -m tools.search --out {out} ...)")
    check_paths(files=[os.path.join(out, "pareto.png")])
    results_path = os.path.join(heldout, "results.json")
    if not os.path.isfile(results_path):
        raise ValueError(f"{results_path} does not exist: run the evaluate.py command the search printed")
    pareto, results = read_pareto(path), read_results(results_path)
    found = points_evaluated(results, path, len(pareto["points"]))
    if not found:
        raise ValueError(f"{results_path} holds no point of {path} (methods spelled PATH/pareto.json#k): it is "
                         "another search's or run's folder; give --report the folder of the command the search "
                         "printed (nothing was changed)")
    run = (pareto["search"]["sampler"], pareto["search"]["steps"])
    if other := [f"#{k}" for k, e in found.items() if (e.get("sampler"), e.get("steps")) != run]:
        raise ValueError(f"{results_path} evaluated {', '.join(other)} on another run than the search's "
                         f"({run[0]}, {run[1]} steps); {RESULTS_FIX}")
    return path, pareto, results, found


def check_ship(ship):
    """--ship names a new file in a folder that exists or can be made (no file on the way to it)."""
    if os.path.exists(ship):
        raise ValueError(f"--ship {ship} exists; remove it or choose another file (it is not overwritten)")
    folder = os.path.dirname(os.path.abspath(ship))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"--ship {ship}: {folder} is a file, so nothing can be written under it; choose another path")


def read_pareto(path):
    """A search's pareto.json: its points (schedule entries) and the record of the run it searched."""
    pareto = read_json(path, "points", PARETO_FIX)
    if not isinstance(pareto["points"], list) or not all(isinstance(p, dict) for p in pareto["points"]):
        raise ValueError(f"{path}: 'points' is not a list of schedule entries; {PARETO_FIX}")
    search = pareto.get("search")
    if not isinstance(search, dict) or "sampler" not in search or "steps" not in search:
        raise ValueError(f"{path} has no 'search' record with the sampler and steps it searched on; {PARETO_FIX}")
    return pareto


def read_results(path):
    """evaluate.py's results.json "methods": {spec: entry}."""
    results = read_json(path, "methods", RESULTS_FIX)["methods"]
    if not isinstance(results, dict) or not all(isinstance(e, dict) for e in results.values()):
        raise ValueError(f"{path}: 'methods' is not an object of method entries; {RESULTS_FIX}")
    return results


def shown_entries(results):
    """The entries of `results` that --report prints and draws beside the searched points."""
    return {spec: e for spec, e in results.items() if spec in ("baseline", *PRESETS_SHOWN)
            or spec.startswith("baseline@")}


def check_entries(path, entries, measures):
    """Every entry reported has its MAC ratio and each measure as a number: checked before pareto.json is
    rewritten, so an edited results.json changes nothing."""
    for spec, entry in entries.items():
        if not is_number(entry.get("mac_ratio")) or entry["mac_ratio"] <= 0:
            raise ValueError(f"{path}: {spec!r} has no mac_ratio (a number > 0); {RESULTS_FIX}")
        for label, value in measures:
            try:
                ok = is_number(value(entry))
            except (KeyError, TypeError, AttributeError):
                ok = False
            if not ok:
                raise ValueError(f"{path}: {spec!r} has no {label} (a number); {RESULTS_FIX}")


def points_evaluated(results, pareto_path, points):
    """{k: evaluate.py's entry} for the methods of `results` that are point k of the file `pareto_path`,
    however the path was spelled (runs/./s/pareto.json, an absolute path)."""
    target, found = os.path.realpath(pareto_path), {}
    for spec, entry in results.items():
        file, sep, k = spec.rpartition("#")
        if sep and k.isdigit() and int(k) < points and os.path.realpath(file) == target:
            found[int(k)] = entry
    return found


def heldout_front(points, value):
    """The points with held-out figures that no other one beats in both `value` and MAC ratio."""
    held = [p for p in points if p["heldout"]]
    front = non_dominated([[-value(p["heldout"]), -p["heldout"]["mac_ratio"]] for p in held])
    return [held[i] for i in sorted(front)]


def accuracy_measures(baseline):
    """[(label, value of an evaluate.py entry)] of the held-out accuracies reported: the overall one and,
    on lab captions, the one-object accuracy (the figure that means something while pairs are near chance)."""
    measures = [("accuracy", lambda entry: entry["accuracy"])]
    if isinstance(baseline.get("by_kind"), dict) and "single" in baseline["by_kind"]:
        measures.append(("one-object accuracy", lambda entry: entry["by_kind"]["single"]["accuracy"]))
    return measures
