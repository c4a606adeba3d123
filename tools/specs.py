"""The method specs of the command-line tools (bench.py, evaluate.py, search.py --methods), and the schedule
files they write (schedule_entry; accel/presets.py reads them):

    baseline | NAME:VALUE (a token method of prune.METHODS, e.g. sito:0.5, todo:2) | a preset |
    a schedule file (FILE.json, FILE.json#k), each optionally on its own run: SPEC@SAMPLER:STEPS.
"""
from dataclasses import dataclass, fields

from accel import PRESETS, Acceleration, check_preset_fits, find_preset, is_schedule_file
from prune import METHODS, as_record, max_ratio, token_method
from sampler import SAMPLERS, call_sigmas, unet_calls
from sampler.schedule import SettingError


def method_syntax():
    """The spellings of a method spec, for error messages and --help."""
    own = ", ".join(f"'{name}:{cls.spec_field[0].upper()}'" for name, cls in METHODS.items())   # R: ratio
    return (f"'baseline', {own} (token methods: R a ratio, 0 <= R <= {max_ratio():g}; F ToDo's factor), "
            f"a preset ({', '.join(PRESETS)}) or a schedule file (FILE.json, FILE.json#k), each optionally "
            "on its own run: SPEC@SAMPLER:STEPS (baseline@dpmpp-2m:20)")


def parse_method(spec):
    """A method spec of the command-line tools -> Acceleration, or None for 'baseline'.

    'baseline' | 'NAME:VALUE' (a token method of prune.METHODS with its spec field, its ratio or
    ToDo's factor, set to VALUE; its default if left out) | a preset name | a schedule file.
    """
    if spec == "baseline":
        return None
    if spec in PRESETS or is_schedule_file(spec):
        return find_preset(spec).acceleration()
    name, colon, text = spec.partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {spec!r}: use {method_syntax()}")
    if not colon:
        return Acceleration(token_method(name))
    field = METHODS[name].spec_field
    kind = next(f.type for f in fields(METHODS[name]) if f.name == field)
    try:
        value = int(text) if kind is int else float(text)
    except ValueError:
        raise ValueError(f"method {spec!r}: {name}'s {field} {text!r} is not a {'whole ' if kind is int else ''}"
                         "number") from None
    return Acceleration(token_method(name, **{field: value}))


@dataclass(frozen=True)
class Method:
    """One entry of the tools' --methods: an acceleration (None: the plain run) on a run of `sampler`
    with `steps` steps."""
    accel: Acceleration | None
    sampler: str
    steps: int

    @property
    def calls(self):
        return unet_calls(self.steps, self.sampler)

    @property
    def sigmas(self):
        """The noise level of each UNet call of its run (on the acceleration's timesteps, if it gives them)."""
        return call_sigmas(self.sampler, self.steps, self.accel.timesteps or None if self.accel else None)


def parse_run(spec, text):
    """'dpmpp-2m:20' (the part of a method spec after '@') -> (sampler, steps)."""
    sampler, colon, steps = text.partition(":")
    if sampler not in SAMPLERS or not colon or not steps.isdigit():
        raise ValueError(f"method {spec!r}: after '@' give SAMPLER:STEPS, e.g. {spec.partition('@')[0]}@dpmpp-2m:20 "
                         f"(samplers: {', '.join(SAMPLERS)})")
    try:
        unet_calls(int(steps), sampler)
    except SettingError as e:
        raise ValueError(f"method {spec!r}: the step count after '{sampler}:' {e.problem}") from None
    return sampler, int(steps)


def parse_run_method(spec, sampler, steps):
    """One method spec 'SPEC' or 'SPEC@SAMPLER:STEPS' -> Method. Without '@' the method runs on the
    command's run (`sampler`, `steps`), except a schedule file, which keeps the run it records."""
    base, at, run = spec.partition("@")
    preset = find_preset(base) if base in PRESETS or is_schedule_file(base) else None
    if at:
        sampler, steps = parse_run(spec, run)
    elif is_schedule_file(base):
        sampler, steps = preset.made_for
    accel = preset.acceleration() if preset is not None else parse_method(base)
    if preset is not None:
        try:
            check_preset_fits(base, sampler, steps, preset)
        except ValueError as e:   # and how --methods says it
            made = preset.made_for
            raise ValueError(f"{e} (in --methods: {base}@{made[0]}:{made[1]})") from None
    method = Method(accel, sampler, steps)
    if accel is not None:
        accel.check(method.calls, method.sigmas)
    return method


def parse_methods(text, sampler, steps):
    """A comma-separated list of method specs (the tools' --methods) -> {spec: Method}, each on its own run
    (SPEC@SAMPLER:STEPS) or on the command's (`sampler` with `steps` steps), and checked against it."""
    specs = [spec.strip() for spec in text.split(",")]
    if not all(specs) or len(set(specs)) != len(specs):
        raise ValueError(f"--methods {text!r}: give a comma-separated list of distinct methods")
    methods = {spec: parse_run_method(spec, sampler, steps) for spec in specs}
    for i, spec in enumerate(specs):   # two spellings of one run (sito:0.5, sito:0.50) would be timed twice
        if same := [other for other in specs[:i] if methods[other] == methods[spec]]:
            raise ValueError(f"--methods: {same[0]!r} and {spec!r} are the same run; give it once")
    return methods


def schedule_entry(accel, sampler, steps, about="", **extra):
    """One schedule of a schedule file: the per-call plan of `accel` for a run of `sampler` with `steps`
    steps, spelled out call by call (cache depths, pruning; guidance modes, skipped calls, timesteps, the
    forecast order and the gate when set); `extra` (e.g. measured quality) is kept."""
    calls = unet_calls(steps, sampler)
    prune = None
    if accel.prune is not None:
        prune = as_record(accel.prune)
        if "schedule" in prune:
            prune["schedule"] = [accel.prune.ratio_at(i, calls) for i in range(calls)]
    entry = {"sampler": sampler, "steps": steps, "depths": list(accel.depths(calls)), "prune": prune}
    if accel.guidance is not None:
        sigmas = call_sigmas(sampler, steps, accel.timesteps or None)
        entry["guidance"] = [plan.guidance for plan in accel.plans(calls, sigmas)]
        if accel.guidance.stop:
            entry["guidance_stop"] = accel.guidance.stop
    if accel.skip is not None:
        entry["skip"] = list(accel.skip.calls)
    if accel.timesteps:
        entry["timesteps"] = list(accel.timesteps)
    if accel.cache is not None and accel.cache.order:
        entry["order"] = accel.cache.order
    if accel.gate is not None:
        entry["gate"] = accel.gate.call
    return {**entry, "about": about, **extra}
