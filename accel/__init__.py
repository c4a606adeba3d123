"""Where token methods (prune/), feature caching (cache/), guidance per call (guidance.py),
skipped calls (skip.py) and cached cross-attention (gate.py) meet: one accelerated run's state
and plan per UNet call (run.py), and the published presets and schedule files (presets.py).

    from accel import PRESETS, Acceleration
    from prune import token_method
    run = Sampling(steps=20, sampler="dpmpp-2m", accel=PRESETS["deepcache-n3"].acceleration())
    run = Sampling(accel=Acceleration(prune=token_method("todo", factor=2)))
"""
from .gate import Gate
from .guidance import Guidance
from .presets import (
    PRESETS,
    Preset,
    check_preset_fits,
    find_preset,
    is_schedule_file,
    load_schedule,
)
from .run import AcceleratedRun, Acceleration
from .skip import Skip

__all__ = ["Acceleration", "AcceleratedRun", "PRESETS", "Preset", "find_preset", "load_schedule",
           "is_schedule_file", "check_preset_fits", "Gate", "Guidance", "Skip"]
