"""Cross-attention gating (T-GATE, Zhang et al. 2024).

Cross-attention, the only place the prompt enters the UNet, converges early: after a few calls
its output hardly changes. At the last call before the gate (a full, guided call) every
cross-attention's output is remembered as the mean of its two branches, (out_u + out_c) / 2, and
every later call reads that instead of attending to the prompt. With the prompt gone from the UNet
the two guidance branches are the same computation, so the later calls run one branch (guidance
"cond"). They save each cross-attention's projections and matmuls and half the batch.
"""
import numbers
from dataclasses import dataclass

CROSS = ("compute", "keep", "cached")   # per call: computed; computed and remembered; read


@dataclass(frozen=True)
class Gate:
    """call: the first UNet call whose cross-attention is read from the cache (call - 1, the gate
    call, must be a full guided call). About 0.4 of the run, T-GATE's SD setting: on DPM++(2M)-10
    call 4 (docs/caching.md)."""
    call: int

    def cross_for(self, calls):
        """What each of a run's `calls` UNet calls does with its cross-attention (CROSS)."""
        if self.call >= calls:
            raise ValueError(f"gate call {self.call} is not a UNet call of this run "
                             f"(1 .. {calls - 1})")
        return ["keep" if i == self.call - 1 else "cached" if i >= self.call else "compute"
                for i in range(calls)]

    def __post_init__(self):
        if (isinstance(self.call, bool) or not isinstance(self.call, numbers.Integral)
                or self.call < 1):
            raise ValueError(f"gate: the first UNet call with cached cross-attention, an index "
                             f">= 1 (the call before it remembers the cross-attention), "
                             f"got {self.call!r}")
