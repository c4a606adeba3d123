"""What evaluate.py, search.py and the paired-test command read back from a results folder, checked before
any work is done: a damaged or hand-edited file ends in one line naming the file, the field and the fix,
never in a traceback after the rendering.

    timing = read_timing("runs/q/timing.json")                  # {} when absent
    check_paths(files=[...], folders=[...])                     # nothing in the way of what a run writes
    records = read_log("runs/s/evaluations.jsonl", repair=True, fields=("key", "share"))
"""
import json
import math
import os
import re

from PIL import Image

from tools.cli import read_json

TIMING_FIX = ("delete it to go on without the old timings (speed-ups then come only from batches rendered again: "
              "delete a method's images to time them anew)")
RESULTS_FIX = "rerun evaluate.py to rewrite it"


def folder_name(spec):
    """A method spec as evaluate.py's folder name: sito:0.5 -> sito_0.5."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", spec)


def image_path(out, spec, k):
    return os.path.join(out, folder_name(spec), f"{k:05d}.png")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_any_json(path, fix):
    """The JSON value in `path`, of any type (read_json wants an object); one line naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({str(e).splitlines()[0][:120]}); {fix}") from None


def check_paths(files=(), folders=()):
    """Every path a run writes a file to is a file or absent, every folder it writes into a folder or absent:
    found now, before the rendering, not when the first write fails."""
    for path in files:
        if os.path.exists(path) and not os.path.isfile(path):
            raise ValueError(f"{path} is a folder (or not a plain file) where a file is written; move it away")
    for path in folders:
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{path} is a file where a folder of results is kept; move it away")


def check_outputs(out, specs, n):
    """Nothing in the way of what an evaluate.py run writes (a folder where an image or results.json goes),
    and a timing.json it can add to."""
    folders = [os.path.join(out, folder_name(spec)) for spec in specs]
    ours = ("settings.json", "timing.json", "results.json", "results.md", "grid.png", "quality_vs_speed.png")
    images = [image_path(out, spec, k) for spec in specs for k in range(n)]
    records = [os.path.join(folder, "settings.json") for folder in folders]
    check_paths(files=[*images, *records, *(os.path.join(out, name) for name in ours)], folders=folders)
    read_timing(os.path.join(out, "timing.json"))


def check_images(paths, flag):
    """Every file of `paths` decodes (PIL's verify: cheap, no pixels), so a damaged reference image is
    named before the rendering rather than after it."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:   # PIL raises OSError, SyntaxError, struct.error... for a damaged file
            raise ValueError(f"{flag}: {path} is not a readable image ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:80] if str(e) else 'damaged'}); replace or remove it") from None


def is_timing(t):
    return isinstance(t, dict) and isinstance(t.get("run"), str) and is_number(t.get("seconds_per_image")) \
        and t["seconds_per_image"] > 0


def upgrade_timing(entry):
    """A method's timing in its form before batches were kept apart (one run's list of values)."""
    values = entry.get("unet_seconds_per_image")
    if not isinstance(values, list):
        return entry
    return {f"run-{entry.get('run')}-{i}": [{"run": entry.get("run"), "device": entry.get("device"),
                                             "seconds_per_image": v}] for i, v in enumerate(values)}


def read_timing(path):
    """evaluate.py's timing.json in today's form, {spec: {batch: [{"run", "device", "seconds_per_image"}]}};
    {} when absent."""
    if not os.path.exists(path):
        return {}
    data = read_any_json(path, TIMING_FIX)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not an object of methods' timings; {TIMING_FIX}")
    timing = {spec: upgrade_timing(entry) if isinstance(entry, dict) else entry for spec, entry in data.items()}
    for spec, batches in timing.items():
        if not isinstance(batches, dict) or not all(isinstance(runs, list) and all(map(is_timing, runs))
                                                    for runs in batches.values()):
            raise ValueError(f"{path}: the timings of {spec!r} are not per-batch lists of {{run, seconds_per_image}}; "
                             f"{TIMING_FIX}")
    return timing


def check_verdicts(path, results, specs):
    """Each of `specs` has one 0/1 checker verdict per image, the same number for all."""
    n = None
    for spec in specs:
        entry = results.get(spec)
        if not isinstance(entry, dict) or "verdicts" not in entry:
            raise ValueError(f"{spec!r} has no checker verdicts in {path} (methods: {', '.join(results)}); "
                             "verdicts are stored for lab captions by evaluate.py")
        verdicts = entry["verdicts"]
        if not isinstance(verdicts, list) or any(v not in (0, 1) or isinstance(v, float) for v in verdicts) \
                or n is not None and len(verdicts) != n:
            raise ValueError(f"{path}: the verdicts of {spec!r} are not one 0/1 per image of the same run "
                             f"(the file was edited or mixes runs); {RESULTS_FIX}")
        n = len(verdicts)
    return n


def check_figures(path, spec, entry, n):
    """{kind: its image indices} of one method's entry, whose accuracy and per-kind figures must be whole:
    each kind's accuracy, and image indices that split the n images among the kinds."""
    def refuse(field, what):
        raise ValueError(f"{path}: the {field} of {spec!r} is not {what}; {RESULTS_FIX}")
    if not is_number(entry.get("accuracy")):
        refuse("accuracy", "a number")
    by_kind = entry.get("by_kind")
    if not isinstance(by_kind, dict) or not all(isinstance(e, dict) for e in by_kind.values()):
        refuse("by_kind", "an object of per-kind figures")
    for kind, figures in by_kind.items():
        if not is_number(figures.get("accuracy")):
            refuse(f"by_kind.{kind}.accuracy", "a number")
        images = figures.get("images")
        if not isinstance(images, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in images):
            refuse(f"by_kind.{kind}.images", "a list of image indices")
    if sorted(i for e in by_kind.values() for i in e["images"]) != list(range(n)):
        refuse("by_kind", f"a split of its {n} images among the kinds (an index is missing, repeated or beyond)")
    return {kind: e["images"] for kind, e in by_kind.items()}


def paired_results(path, specs):
    """evaluate.py's results.json "methods", checked for McNemar's test of specs[1:] against specs[0]: one
    verdict per image each, and per-kind figures over the same images as the reference's."""
    results = read_json(path, "methods", "give the results.json an evaluate.py run wrote")["methods"]
    if not isinstance(results, dict):
        raise ValueError(f"{path}: 'methods' is not an object of method entries; {RESULTS_FIX}")
    n = check_verdicts(path, results, specs)
    kinds = check_figures(path, specs[0], results[specs[0]], n)
    for spec in specs[1:]:
        if check_figures(path, spec, results[spec], n) != kinds:
            raise ValueError(f"{path}: the kinds (by_kind) of {spec!r} are not over the same images as "
                             f"those of {specs[0]!r}, so they are not one run's; {RESULTS_FIX}")
    return results


def read_log(path, repair, fields=("key", "share")):
    """search.py's resume log, its records in order. A last line without its newline is an append that was
    cut off (the process was killed): it is dropped, and with `repair` cut from the file, so the next append
    starts a line of its own. A broken line anywhere else, or a record without one of `fields`, is a damaged
    log, refused by line number."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines, records = data.split(b"\n"), []
    if lines[-1].strip():   # the cut-off append
        print(f"{path}: dropping the last, half-written evaluation (the run was killed while writing it)")
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        missing = [k for k in fields if k not in record] if isinstance(record, dict) else None
        if missing is None or missing:
            why = f" (no {', '.join(missing)})" if missing else ""
            raise ValueError(f"{path} line {number} is not an evaluation record{why}: the log is damaged; move it "
                             "away to start the search afresh in this --out")
        records.append(record)
    return records
