"""Acceleration settings under a name: the published presets (DeepCache, DaTo, Align Your Steps)
and schedule files (per-call plans: cache depths, pruning, guidance, skipped calls, a gate, as
search.py writes them), each with the run it was made for.

    from accel import PRESETS, find_preset
    accel = PRESETS["deepcache-n3"].acceleration()
    accel = find_preset("lab/schedules/plms50.json#1").acceleration()
"""
import json
import os
from dataclasses import dataclass

from cache import DATO_COCO, DATO_FIXED, FULL, CacheSchedule, from_dato
from prune import DaTo, TokenMethod, from_record
from sampler import call_sigmas, find_sampler, unet_calls
from sampler.schedule import SettingError, check_steps

from .gate import Gate
from .guidance import Guidance
from .run import Acceleration
from .skip import Skip

AYS_SD15_10 = (999, 850, 736, 645, 545, 455, 343, 233, 124, 24)   # Sabour et al. 2024, for SD1.5


@dataclass(frozen=True)
class Preset:
    """Settings under a name (sample.py --preset NAME, bench.py / evaluate.py --methods NAME): a
    published one, or a schedule file (FILE.json or FILE.json#k, e.g. what search.py found)."""
    cache: CacheSchedule | None
    prune: TokenMethod | None
    about: str
    made_for: tuple | None = None   # (sampler, steps) a per-call schedule is for (None: any run)
    guidance: Guidance | None = None
    skip: Skip | None = None
    timesteps: tuple = ()
    gate: Gate | None = None

    def acceleration(self):
        return Acceleration(self.prune, self.cache, guidance=self.guidance, skip=self.skip,
                            timesteps=self.timesteps, gate=self.gate)


PRESETS = {
    "deepcache-n3": Preset(CacheSchedule("uniform", interval=3, depth=2), None,
                           "DeepCache SD1.5 N=3 (paper: 1.72x), a full call every 3 calls, "
                           "depth 2; also DeepCache's SDXL setting (its README: 2.6x)"),
    "deepcache-n5": Preset(CacheSchedule("uniform", interval=5, depth=2), None,
                           "DeepCache SD1.5 (paper: 2.15x), a full call every 5 calls, depth 2"),
    "deepcache-n5-nonuniform": Preset(
        CacheSchedule("nonuniform", interval=5, depth=2, center=15, power=1.4), None,
        "DeepCache SD1.5 non-uniform: full calls denser around call 15 (c=15, p=1.4)"),
    # DaTo's pruning ratio is 0.4 throughout: its released code hard-codes it (docs/methods.md)
    "dato-fixed": Preset(
        CacheSchedule("dato", depths=from_dato(DATO_FIXED)), DaTo(ratio=0.4, gamma=0.1),
        "DaTo: the cache vector its ratio searches use (6 full, 38 shallow, 7 reuse) + DaTo "
        "pruning at 0.4 as in those searches (txt2img_gen): dynamics base tokens, gamma=0.1, "
        "noise_alpha=0.1; for PLMS-50", made_for=("plms", 50)),
    "dato-coco": Preset(
        CacheSchedule("dato", depths=from_dato(DATO_COCO)), DaTo(ratio=0.4),
        "DaTo: the vector it evaluates with pruning on COCO-30k (5 full, 21 shallow, 25 reuse) + "
        "DaTo pruning at 0.4 as the official run_command9: dynamics base tokens, gamma=1, "
        "noise_alpha=0.1; for PLMS-50", made_for=("plms", 50)),
    "dato-coco-random": Preset(CacheSchedule("dato", depths=from_dato(DATO_COCO)),
                               DaTo(ratio=0.4, base_tokens="local_random"),
                               "DaTo: the dato-coco cache vector + DaTo pruning at 0.4 as the "
                               "official run_command8: local_random base tokens (one random "
                               "pattern per UNet call); for PLMS-50", made_for=("plms", 50)),
    "ays-10": Preset(None, None, "Align Your Steps' SD1.5 timesteps for 10 steps (999, 850, ..., "
                     "24; the paper's Table, diffusers' AysSchedules), with DPM-Solver++(2M) "
                     "as the paper", made_for=("dpmpp-2m", 10), timesteps=AYS_SD15_10),
}


PLAN_FIELDS = ("sampler", "steps", "depths", "prune", "guidance", "guidance_stop", "skip",
               "timesteps", "order", "gate")
# what was measured, read by no run
RECORD_FIELDS = ("about", "mac_ratio", "search_quality", "speedup", "heldout")


def is_schedule_file(spec):
    return spec.partition("#")[0].endswith(".json")


def load_schedule(spec):
    """The Preset of a schedule file: 'FILE.json' (a file of one schedule) or 'FILE.json#k' (point
    k of a file of several under "points", as search.py writes its Pareto set)."""
    path, hash_, index = spec.partition("#")
    if not os.path.isfile(path):
        raise ValueError(f"schedule file {path!r} "
                         + ("is a folder" if os.path.isdir(path) else "does not exist"))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:   # deep JSON
        raise ValueError(f"schedule file {path!r} is not readable JSON "
                         f"({str(e).splitlines()[0][:120]})") from None
    points = data.get("points", [data]) if isinstance(data, dict) else None
    if not isinstance(points, list) or not points:
        raise ValueError(f"schedule file {path!r}: expected a schedule or "
                         f"{{\"points\": [schedules]}}")
    if not hash_ and len(points) > 1:
        raise ValueError(f"schedule file {path!r} holds {len(points)} schedules: pick one, "
                         f"{path}#0 .. {path}#{len(points) - 1}")
    if not (index if hash_ else "0").isdigit() or int(index or 0) >= len(points):
        raise ValueError(f"{spec!r}: {path} holds schedules #0 .. #{len(points) - 1}")
    entry = points[int(index or 0)]
    if not isinstance(entry, dict):
        raise ValueError(f"{spec!r} is not a schedule (a JSON object with sampler, steps, depths, "
                         "prune)")
    # a misspelt field would drop a part
    if unknown := sorted(set(entry) - set(PLAN_FIELDS) - set(RECORD_FIELDS)):
        raise ValueError(f"{spec!r}: unknown field{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; a schedule's fields are "
                         f"{', '.join(PLAN_FIELDS + RECORD_FIELDS)}; fix the file")
    for field, check in (("sampler", find_sampler), ("steps", check_steps)):
        try:   # the run's own checks, the problem named by the file's field
            check(entry.get(field))
        except SettingError as e:
            raise ValueError(f"{spec!r}: its field \"{field}\" {e.problem}; fix the file") from None
    steps = entry["steps"]
    if not isinstance(entry.get("depths"), list):
        raise ValueError(f"{spec!r}: its field \"depths\" must be a list, one cache depth per UNet "
                         "call; fix the file")
    if not isinstance(entry.get("prune"), (dict, type(None))):
        raise ValueError(f"{spec!r}: its field \"prune\" must be a token method's settings (an "
                         "object) or null; fix the file")
    made_for, depths = (entry["sampler"], steps), tuple(entry["depths"])
    if len(depths) != (calls := unet_calls(steps, made_for[0])):
        raise ValueError(f"{spec!r}: {len(depths)} depths for {made_for[0].upper()}-{steps}, which "
                         f"makes {calls} UNet calls")
    try:
        order = entry.get("order", 0)
        cache = (CacheSchedule("dato", depths=depths, order=order) if any(d != FULL for d in depths)
                 else None)
        prune = from_record(entry["prune"]) if entry.get("prune") is not None else None
        guidance = Guidance(modes=entry["guidance"], stop=entry.get("guidance_stop", 0.0)) \
            if entry.get("guidance") is not None else None
        skip = Skip(entry["skip"]) if entry.get("skip") is not None else None
        timesteps = tuple(entry.get("timesteps") or ())
        gate = Gate(entry["gate"]) if entry.get("gate") is not None else None
        preset = Preset(cache, prune, entry.get("about", ""), made_for, guidance, skip,
                        timesteps, gate)
        accel = preset.acceleration()
        # checks the first call full, a ratio and a mode per call, the timesteps' run
        accel.check(len(depths), call_sigmas(made_for[0], made_for[1], timesteps or None))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{spec!r} is not a valid schedule ({type(e).__name__}: {e}); "
                         "fix the file") from None
    return preset


def find_preset(spec):
    """A preset by name, or a schedule file."""
    if not isinstance(spec, str):
        raise ValueError(f"a preset is a name or a schedule file path, got {spec!r}")
    if spec in PRESETS:
        return PRESETS[spec]
    if is_schedule_file(spec):
        return load_schedule(spec)
    raise ValueError(f"unknown preset {spec!r}: use one of {', '.join(PRESETS)} or a schedule file "
                     "FILE.json[#k]")


def check_preset_fits(spec, sampler, steps, preset=None):
    """A preset or schedule file made for one run (DaTo's PLMS-50 vectors) is refused for another,
    by name. preset: `spec` already found (a file is read once), else it is found here."""
    preset = preset or find_preset(spec)
    if preset.made_for is not None and preset.made_for != (sampler, steps):
        made, calls = preset.made_for, unet_calls(preset.made_for[1], preset.made_for[0])
        raise ValueError(f"preset {spec} is for {made[0].upper()}-{made[1]} ({calls} UNet calls); "
                         f"this run is {sampler.upper()}-{steps} ({unet_calls(steps, sampler)} "
                         f"calls): run it with sampler {made[0]} and {made[1]} steps")
