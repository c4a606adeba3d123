"""How each UNet call of a guided run combines the conditional and unconditional predictions.

Classifier-free guidance runs every call on [x; x] with contexts [uncond; cond] and takes
eps = eps_u + w·(eps_c - eps_u): twice the work of one conditional prediction. Guidance matters
most at mid noise (Kynkäänniemi et al. 2024) and Δ = eps_c - eps_u changes slowly, so a call runs
- "both": the guided batch, as SD does (and remember Δ);
- "cond": the conditional prediction alone, at half the batch (no guidance);
- "reuse": the conditional prediction plus the last guided call's Δ, eps = eps_c + (w - 1)·Δ
  (eps_u + w·Δ is the same sum), at half the batch.
On a v-prediction model the combination is made on the raw outputs, as guidance is.

Adaptive guidance (Castillo et al. 2023) decides per image instead: once cos(eps_c, eps_u) >
`stop` over an image, its later calls run its conditional branch alone (stopped stays stopped;
its reused Δ is 0); a guided call's batch is [uncond of the images still guided; cond of all].
The decision reads the outputs, so it is made on the host between calls (docs/caching.md).
"""
import math
import numbers
from dataclasses import dataclass

from sampler.loop import GUIDANCE as MODES

OUTSIDE = ("cond", "reuse")


@dataclass(frozen=True)
class Guidance:
    """Which calls of a run are guided; give `modes` or `window`, or `stop` alone (every call
    guided until each image stops).

    modes: one mode of MODES per UNet call (what search.py writes).
    window: (σ_lo, σ_hi): guided where the call's noise level σ lies in (σ_lo, σ_hi], `outside`
        elsewhere; needs the run's σ per call (sampler.call_sigmas). Kynkäänniemi et al.
        recommend (0.28, 5.42] for SD-XL, from a 0.002..80 σ range; SD1's trained range is
        0.029..14.6.
    outside: what the calls outside the window do, "cond" (the paper) or "reuse".
    stop: adaptive guidance: an image's guided calls run its conditional branch alone from the call
        after cos(eps_c, eps_u) first exceeds `stop` (0: never). ε-space cosines are close to 1: on
        the lab model 0.99993 holds DPM++(2M)-10's accuracy (1.22x), 0.9999 stops a third of the
        images at call 1 and loses.
    """
    modes: tuple = ()
    window: tuple | None = None
    outside: str = "cond"
    stop: float = 0.0

    def modes_for(self, calls, sigmas=None):
        """The mode of each of a run's `calls` UNet calls; `sigmas`: their noise levels (a window
        needs them)."""
        if self.window is None and not self.modes:
            return ["both"] * calls
        if self.window is None:
            if len(self.modes) != calls:
                raise ValueError(f"guidance has {len(self.modes)} modes, but this run makes "
                                 f"{calls} UNet calls; give one per call")
            return list(self.modes)
        if sigmas is None:
            raise ValueError("a guidance window needs the noise level of each UNet call of the run")
        lo, hi = self.window
        return ["both" if lo < s <= hi else self.outside for s in sigmas]

    def __post_init__(self):
        if isinstance(self.modes, list):   # JSON's arrays: stored as the tuple they mean
            object.__setattr__(self, "modes", tuple(self.modes))
        if isinstance(self.window, list):
            object.__setattr__(self, "window", tuple(self.window))
        if self.modes and self.window is not None:
            raise ValueError("guidance: give either one mode per call (modes) or a noise-level "
                             "window (window)")
        if not (self.modes or self.window is not None or self.stop):
            raise ValueError("guidance: give one mode per call (modes), a noise-level window "
                             "(window) or an adaptive stop (stop)")
        if (isinstance(self.stop, bool) or not isinstance(self.stop, numbers.Real)
                or not 0 <= self.stop < 1):
            raise ValueError(f"guidance stop is a cosine similarity in [0, 1) (0: never stop), "
                             f"got {self.stop!r}")
        if not isinstance(self.modes, tuple) or set(self.modes) - set(MODES):
            raise ValueError(f"guidance modes must be one of {', '.join(MODES)} per UNet call, "
                             f"got {self.modes!r}")
        if self.window is not None:
            if (not isinstance(self.window, tuple) or len(self.window) != 2 or
                    not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and
                            math.isfinite(s) for s in self.window) or
                    not 0 <= self.window[0] < self.window[1]):
                raise ValueError(f"guidance window must be (σ_lo, σ_hi) with 0 <= σ_lo < σ_hi, "
                                 f"got {self.window!r}")
        if self.outside not in OUTSIDE:
            raise ValueError(f"guidance outside the window must be one of {', '.join(OUTSIDE)}, "
                             f"got {self.outside!r}")
