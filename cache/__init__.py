"""Feature caching across UNet calls (DeepCache, DaTo): schedules of full and cached calls.

The cached forward itself is in model/unet.py (UNetModel.forward), driven by the per-run state
(sampler/accel.py); this package decides, call by call, how deep each call recomputes.
"""
from .presets import PRESETS, Preset
from .schedule import FULL, MODES, CacheSchedule, deepcache_nonuniform

__all__ = ["CacheSchedule", "FULL", "MODES", "PRESETS", "Preset", "deepcache_nonuniform"]
