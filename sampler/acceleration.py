"""Published caching (+ pruning) settings by name: sample.py --preset NAME, bench.py."""
from dataclasses import dataclass

from prune import TokenPruning

from .schedule import FULL, CacheSchedule

# DaTo's released cache vectors (github.com/EvelynZhang-epiclab/DaTo, sd1/scripts): entry i is
# UNet call i + 1 of a PLMS-50 run (call 0 is always full); 0 = reuse everything, 1 = shallow,
# and its code treats every value >= 2 (written 11 or 12) as a full call.
DATO_FIXED = (0, 1, 1, 1, 1, 1, 11, 1, 1, 1, 1, 1, 1, 1, 0, 0, 11, 1, 1, 1, 0, 11, 1, 0, 1, 1, 1, 1, 1, 11,
              0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 11, 1, 1, 1, 1, 1, 1, 1, 1, 1)
DATO_COCO = (1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 12, 1, 0, 0, 0, 1, 1, 0, 1, 0, 12, 0, 0, 0, 0, 0, 0,
             1, 0, 1, 0, 1, 12, 0, 0, 0, 0, 0, 0, 1, 0, 1, 12, 0, 1, 0, 1)


def from_dato(vector):
    """A DaTo 50-entry vector -> our 51-entry per-call depths (full first; >= 2 -> FULL)."""
    return (FULL,) + tuple(FULL if v >= 2 else v for v in vector)


@dataclass(frozen=True)
class Preset:
    cache: CacheSchedule
    prune: TokenPruning | None
    about: str


PRESETS = {
    "deepcache-n3": Preset(CacheSchedule("uniform", interval=3, depth=2), None,
                           "DeepCache SD1.5 N=3 (paper: 1.72x), a full call every 3 calls, depth 2"),
    "deepcache-n5": Preset(CacheSchedule("uniform", interval=5, depth=2), None,
                           "DeepCache SD1.5 (paper: 2.15x), a full call every 5 calls, depth 2"),
    "deepcache-n5-nonuniform": Preset(CacheSchedule("nonuniform", interval=5, depth=2, center=15, power=1.4), None,
                                      "DeepCache SD1.5 non-uniform: full calls denser around call 15 (c=15, p=1.4)"),
    "dato-fixed": Preset(CacheSchedule("dato", depths=from_dato(DATO_FIXED)), TokenPruning("dato", ratio=0.4),
                         "DaTo: the cache vector its ratio searches use (6 full, 38 shallow, 7 reuse) "
                         "+ DaTo pruning at 0.4; PLMS-50 only"),
    "dato-coco": Preset(CacheSchedule("dato", depths=from_dato(DATO_COCO)), TokenPruning("dato", ratio=0.4),
                        "DaTo: the vector it evaluates with pruning on COCO-30k (5 full, 21 shallow, 25 reuse) "
                        "+ DaTo pruning at 0.4; PLMS-50 only"),
}
