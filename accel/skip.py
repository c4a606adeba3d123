"""UNet calls that are not made: the sampler's noise estimate extrapolated instead (ZEUS, 2026).

A skipped call i returns eps_i = 2·eps_(i-1) - eps_(i-2), the line through the two previous
estimates the sampler received (guided, after any v conversion). The sampler takes it as its
model output, so x0 is recomputed from the current latent and a multistep solver (PLMS, DPM++)
keeps its own history: the skip is part of the ODE update, not a stale copy of the last step's
result. Never two in a row (the line would rest on an extrapolation).
"""
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Skip:
    """calls: the indices of the UNet calls to skip, each >= 2 (two estimates must exist), none
    right after another (e.g. (3, 5, 7) of a 10-call run)."""
    calls: tuple = ()

    def skipped_for(self, calls):
        """Whether each of a run's `calls` UNet calls is skipped."""
        if self.calls[-1] >= calls:
            raise ValueError(f"skipped call {self.calls[-1]} is not a UNet call of this run "
                             f"(0 .. {calls - 1})")
        return [i in self.calls for i in range(calls)]

    def __post_init__(self):
        if isinstance(self.calls, list):   # JSON's arrays: stored as the tuple they mean
            object.__setattr__(self, "calls", tuple(self.calls))
        if not isinstance(self.calls, tuple) or not self.calls or any(
                isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in self.calls):
            raise ValueError(f"skip: give the indices of the UNet calls to skip, "
                             f"got {self.calls!r}")
        if list(self.calls) != sorted(set(self.calls)) or self.calls[0] < 2:
            raise ValueError(f"skipped calls must be distinct call indices >= 2 in order (two "
                             f"estimates to extrapolate from), got {list(self.calls)}")
        if any(b - a == 1 for a, b in zip(self.calls, self.calls[1:], strict=False)):
            raise ValueError(f"skipped calls must not follow one another (an extrapolation resting "
                             f"on an extrapolation), got {list(self.calls)}")
