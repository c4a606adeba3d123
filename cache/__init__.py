"""Feature caching across UNet calls (DeepCache, DaTo): schedules of full and cached calls.

The cached forward itself is in model/unet.py (UNetModel.forward), driven by the per-run state
(accel/); this package decides, call by call, how deep each call recomputes.
A leaf, like prune/: it imports no other package of this project.
"""
from .schedule import (
    DATO_COCO,
    DATO_FIXED,
    FULL,
    MODES,
    CacheSchedule,
    deepcache_nonuniform,
    from_dato,
)

__all__ = ["CacheSchedule", "FULL", "MODES", "DATO_FIXED", "DATO_COCO", "from_dato",
           "deepcache_nonuniform"]
