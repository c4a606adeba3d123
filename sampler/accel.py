"""Acceleration settings, and the per-run state the sampler creates from them for each batch.

The UNet never keeps state between calls: everything that spans calls of one sampling run (the
call index, the previous raw outputs, cached features, the random generator of the token
methods) lives in a RunState, which the sampler makes fresh for every batch and passes to each
UNet call as `accel`. Nothing leaks from one run into the next.
"""
from dataclasses import dataclass

import torch

NO_PLANS = (None, None, None)


@dataclass(frozen=True)
class Acceleration:
    """What to accelerate (one per command line / experiment). With everything off the UNet
    runs its plain forward, bit for bit."""

    def start(self, calls, seed):
        """A fresh RunState for a run of `calls` UNet calls; its generator is seeded with `seed`."""
        return RunState(self, calls, seed)


class RunState:
    """State of one sampling run. The sampler calls begin_call(i) before and end_call(output)
    after UNet call i; the UNet's blocks ask it for token plans."""

    def __init__(self, settings, calls, seed):
        self.settings, self.calls = settings, calls
        self.call = None            # index of the UNet call in progress, 0 .. calls-1
        self.generator = torch.Generator().manual_seed(seed)
        self.outputs = []           # the two most recent raw UNet outputs, oldest first

    def begin_call(self, index):
        self.call = index

    def end_call(self, output):
        self.outputs = [*self.outputs[-1:], output]

    def token_plans(self, x, hw):
        """(prune, recover) pairs or None for self-attention, cross-attention and feed-forward."""
        return NO_PLANS
