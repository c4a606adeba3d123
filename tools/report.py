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

PRESETS_SHOWN = ("deepcache-n3", "deepcache-n5", "dato-fixed", "dato-coco")   # seeded, and compared in --report


def non_dominated(scores):
    """Indices of the rows of `scores` (objectives, all minimised) that no other row dominates."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
    return NonDominatedSorting().do(np.array(scores, dtype=float), only_non_dominated_front=True)



def report(out, heldout, ship=None):
    """Held-out figures (evaluate.py's results.json in `heldout`) into pareto.json, and pareto.png; with
    `ship`, the held-out Pareto set written there as a schedule file."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--report draws pareto.png with matplotlib: pip install -r requirements-eval.txt")
    if os.path.isfile(heldout):
        raise ValueError(f"--report {heldout} is a file: give the held-out folder (evaluate.py's --out)")
    if ship and os.path.exists(ship):
        raise ValueError(f"--ship {ship} exists; remove it or choose another file (it is not overwritten)")
    path = os.path.join(out, "pareto.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: run the search first (python -m tools.search --out {out} ...)")
    results_path = os.path.join(heldout, "results.json")
    if not os.path.isfile(results_path):
        raise ValueError(f"{results_path} does not exist: run the evaluate.py command the search printed")
    pareto = read_json(path, "points", "run the search again with the same --out to rewrite it")
    results = read_json(results_path, "methods", "rerun the evaluate.py command the search printed")["methods"]
    found = points_evaluated(results, path, len(pareto["points"]))
    if not found:
        raise ValueError(f"{results_path} holds no point of {path} (methods spelled PATH/pareto.json#k): it is "
                         "another search's or run's folder; give --report the folder of the command the search "
                         "printed (nothing was changed)")
    run = (pareto.get("search", {}).get("sampler"), pareto.get("search", {}).get("steps"))
    if other := [f"#{k}" for k, e in found.items() if (e.get("sampler"), e.get("steps")) != run]:
        raise ValueError(f"{results_path} evaluated {', '.join(other)} on another run than the search's "
                         f"({run[0]}, {run[1]} steps); rerun the evaluate.py command the search printed")
    for k, point in enumerate(pareto["points"]):
        point["heldout"] = found.get(k)   # evaluate.py's whole entry (None: not evaluated in this folder)
    write_json(path, pareto)
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
    draw_pareto(pareto, results, PRESETS_SHOWN, *measures[-1], os.path.join(out, "pareto.png"))
    if ship:
        shipped = heldout_front(pareto["points"], measures[-1][1])
        os.makedirs(os.path.dirname(os.path.abspath(ship)), exist_ok=True)
        write_json(ship, {"points": shipped, "search": pareto["search"]})
        shown = {n: results[n] for n in ("baseline", *PRESETS_SHOWN) if n in results}
        print(f"{len(shipped)} held-out non-dominated schedules in {ship}:\n" + markdown(
            {**shown, **{f"{ship}#{k}": p["heldout"] for k, p in enumerate(shipped)}}))


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
    if "single" in baseline.get("by_kind", {}):
        measures.append(("one-object accuracy", lambda entry: entry["by_kind"]["single"]["accuracy"]))
    return measures
