"""Acceleration settings under a name: the published presets (DeepCache, DaTo) and schedule files
(per-call cache depths and pruning, as search.py writes them), each with the run it was made for.

    from accel import PRESETS, find_preset
    accel = PRESETS["deepcache-n3"].acceleration()
    accel = find_preset("lab/schedules/plms50.json#1").acceleration()
"""
import json
import os
from dataclasses import dataclass

from cache import DATO_COCO, DATO_FIXED, FULL, CacheSchedule, from_dato
from prune import DaTo, TokenMethod, as_record, from_record
from sampler import SAMPLERS, unet_calls
from sampler.schedule import MAX_STEPS

from .run import Acceleration


@dataclass(frozen=True)
class Preset:
    """Settings under a name (sample.py --preset NAME, bench.py / evaluate.py --methods NAME): a published
    one, or a schedule file (FILE.json or FILE.json#k, e.g. what search.py found)."""
    cache: CacheSchedule | None
    prune: TokenMethod | None
    about: str
    run: tuple | None = None   # (sampler, steps) the per-call schedule was made for (None: any run)

    def acceleration(self):
        return Acceleration(self.prune, self.cache)


PRESETS = {
    "deepcache-n3": Preset(CacheSchedule("uniform", interval=3, depth=2), None,
                           "DeepCache SD1.5 N=3 (paper: 1.72x), a full call every 3 calls, depth 2; also DeepCache's "
                           "SDXL setting (its README: 2.6x)"),
    "deepcache-n5": Preset(CacheSchedule("uniform", interval=5, depth=2), None,
                           "DeepCache SD1.5 (paper: 2.15x), a full call every 5 calls, depth 2"),
    "deepcache-n5-nonuniform": Preset(CacheSchedule("nonuniform", interval=5, depth=2, center=15, power=1.4), None,
                                      "DeepCache SD1.5 non-uniform: full calls denser around call 15 (c=15, p=1.4)"),
    # DaTo's pruning ratio is 0.4 throughout: its released code hard-codes it (docs/methods.md, "Differences ...")
    "dato-fixed": Preset(CacheSchedule("dato", depths=from_dato(DATO_FIXED)),
                         DaTo(ratio=0.4, gamma=0.1),
                         "DaTo: the cache vector its ratio searches use (6 full, 38 shallow, 7 reuse) + DaTo pruning "
                         "at 0.4 as in those searches (txt2img_gen): dynamics base tokens, gamma=0.1, noise_alpha=0.1; "
                         "for PLMS-50", run=("plms", 50)),
    "dato-coco": Preset(CacheSchedule("dato", depths=from_dato(DATO_COCO)), DaTo(ratio=0.4),
                        "DaTo: the vector it evaluates with pruning on COCO-30k (5 full, 21 shallow, 25 reuse) + DaTo "
                        "pruning at 0.4 as the official run_command9: dynamics base tokens, gamma=1, noise_alpha=0.1; "
                        "for PLMS-50", run=("plms", 50)),
    "dato-coco-random": Preset(CacheSchedule("dato", depths=from_dato(DATO_COCO)),
                               DaTo(ratio=0.4, base_tokens="local_random"),
                               "DaTo: the dato-coco cache vector + DaTo pruning at 0.4 as the official run_command8: "
                               "local_random base tokens (one random pattern per UNet call); for PLMS-50",
                               run=("plms", 50)),
}


def schedule_entry(accel, sampler, steps, about="", **extra):
    """One schedule of a schedule file: the per-call cache depths and pruning of `accel` for a run of
    `sampler` with `steps` steps, spelled out call by call; `extra` (e.g. measured quality) is kept."""
    calls = unet_calls(steps, sampler)
    prune = None
    if accel.prune is not None:
        prune = as_record(accel.prune)
        if "schedule" in prune:
            prune["schedule"] = [accel.prune.ratio_at(i, calls) for i in range(calls)]
    return {"sampler": sampler, "steps": steps, "depths": list(accel.depths(calls)), "prune": prune,
            "about": about, **extra}


def is_schedule_file(spec):
    return spec.partition("#")[0].endswith(".json")


def load_schedule(spec):
    """The Preset of a schedule file: 'FILE.json' (a file of one schedule) or 'FILE.json#k' (point k of a
    file of several under "points", as search.py writes its Pareto set)."""
    path, hash_, index = spec.partition("#")
    if not os.path.isfile(path):
        raise ValueError(f"schedule file {path!r} " + ("is a folder" if os.path.isdir(path) else "does not exist"))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:   # RecursionError: nested deep
        raise ValueError(f"schedule file {path!r} is not readable JSON ({str(e).splitlines()[0][:120]})") from None
    points = data.get("points", [data]) if isinstance(data, dict) else None
    if not isinstance(points, list) or not points:
        raise ValueError(f"schedule file {path!r}: expected a schedule or {{\"points\": [schedules]}}")
    if not hash_ and len(points) > 1:
        raise ValueError(f"schedule file {path!r} holds {len(points)} schedules: pick one, {path}#0 .. "
                         f"{path}#{len(points) - 1}")
    if not (index if hash_ else "0").isdigit() or int(index or 0) >= len(points):
        raise ValueError(f"{spec!r}: {path} holds schedules #0 .. #{len(points) - 1}")
    entry = points[int(index or 0)]
    if not isinstance(entry, dict):
        raise ValueError(f"{spec!r} is not a schedule (a JSON object with sampler, steps, depths, prune)")
    if entry.get("sampler") not in SAMPLERS:
        raise ValueError(f"{spec!r}: its field \"sampler\" is {entry.get('sampler')!r}, not one of this project's "
                         f"samplers ({', '.join(SAMPLERS)}); fix the file")
    steps = entry.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{spec!r}: its field \"steps\" is {steps!r}, not a step count (1 .. {MAX_STEPS}); "
                         "fix the file")
    if not isinstance(entry.get("depths"), list):
        raise ValueError(f"{spec!r}: its field \"depths\" must be a list, one cache depth per UNet call; fix the file")
    if not isinstance(entry.get("prune"), (dict, type(None))):
        raise ValueError(f"{spec!r}: its field \"prune\" must be a token method's settings (an object) or null; "
                         "fix the file")
    run, depths = (entry["sampler"], steps), tuple(entry["depths"])
    if len(depths) != unet_calls(steps, run[0]):
        raise ValueError(f"{spec!r}: {len(depths)} depths for {run[0].upper()}-{steps}, which makes "
                         f"{unet_calls(steps, run[0])} UNet calls")
    try:
        cache = CacheSchedule("dato", depths=depths) if any(d != FULL for d in depths) else None
        prune = from_record(entry["prune"]) if entry.get("prune") is not None else None
        Acceleration(prune, cache).check(len(depths))   # the first call full, a ratio per call
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{spec!r} is not a valid schedule ({type(e).__name__}: {e}); fix the file") from None
    return Preset(cache, prune, entry.get("about", ""), run)


def find_preset(spec):
    """A preset by name, or a schedule file."""
    if not isinstance(spec, str):
        raise ValueError(f"a preset is a name or a schedule file path, got {spec!r}")
    if spec in PRESETS:
        return PRESETS[spec]
    if is_schedule_file(spec):
        return load_schedule(spec)
    raise ValueError(f"unknown preset {spec!r}: use one of {', '.join(PRESETS)} or a schedule file FILE.json[#k]")



def check_preset_fits(spec, sampler, steps):
    """A preset or schedule file made for one run (DaTo's PLMS-50 vectors) is refused for another, by name."""
    preset = find_preset(spec)
    if preset.run is not None and preset.run != (sampler, steps):
        made, calls = preset.run, unet_calls(preset.run[1], preset.run[0])
        raise ValueError(f"preset {spec} is for {made[0].upper()}-{made[1]} ({calls} UNet calls); this run is "
                         f"{sampler.upper()}-{steps} ({unet_calls(steps, sampler)} calls): use --sampler {made[0]} "
                         f"--steps {made[1]} (or {spec}@{made[0]}:{made[1]} in --methods)")

