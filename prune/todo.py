"""ToDo (Smith et al., 2024): self-attention with keys and values taken from a downsampled grid.

The tokens that self-attention reads its keys and values from (the normed block input, which
feeds to_k and to_v) are resized from h x w to (h // factor) x (w // factor) by interpolation
(nearest-exact: one token of each factor x factor cell, no similarity computed). Queries and the
output grid stay whole, so nothing is copied back and fused attention keeps working; the score
matrix shrinks from N x N to N x N / factor^2. The reference's defaults: docs/methods.md.
"""
from dataclasses import dataclass, replace

import torch.nn.functional as F

from .method import TokenMethod, setting

MODES = ("nearest-exact", "nearest", "bilinear", "bicubic", "area")   # torch interpolation modes


@dataclass(frozen=True)
class ToDo(TokenMethod):
    """ToDo's settings beside TokenMethod's; recommended values are the defaults.

    factor: keys/values come from a grid `factor` times smaller per side (2; 2-3 recommended).
    mode: torch interpolation mode ("nearest-exact", the reference's).
    stop: the last fraction of the run's UNet calls that run without downsampling (0; 0.2-0.4
        keeps the final details, at a smaller saving).
    layers: self-attention only: ToDo reduces the keys/values of attn1.
    """
    name = "todo"
    spec_field = "factor"
    reduces = "keys_values"
    factor: int = setting(2, "factor",
                          "ToDo: keys/values from a grid this much smaller per side (2)", int)
    mode: str = setting("nearest-exact", "mode", "ToDo: how the grid is downsampled "
                        "(nearest-exact)", choices=MODES)
    stop: float = setting(0.0, "stop", "ToDo: the last fraction of UNet calls run without it "
                          "(0; 0.2-0.4)", float)

    def ratio_at(self, call, calls):
        """The fraction of keys/values removed (1 - 1/factor^2 on a divisible grid) before the last
        `stop` of the calls, 0 after."""
        return 1 - 1 / self.factor ** 2 if call < round(calls * (1 - self.stop)) else 0.0

    def every_call(self, ratio):
        return replace(self, stop=0.0)

    def fits(self, hw):
        return hw[0] >= self.factor and hw[1] >= self.factor

    def tokens_into(self, sub, hw, ratio):
        return (hw[0] // self.factor) * (hw[1] // self.factor) if sub == "kv1" else hw[0] * hw[1]

    def plan(self, x, hw, ratio, generator=None, dynamics=None, guided=False):
        return KeysValues(hw, (hw[0] // self.factor, hw[1] // self.factor), self.mode)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.factor, int) or self.factor < 2:   # 1 would be the plain run
            raise ValueError(f"ToDo's factor must be a whole number >= 2 (1 changes nothing), "
                             f"got {self.factor!r}")
        if not 0 <= self.stop < 1:   # 1 would leave every call as it is
            raise ValueError(f"ToDo's stop is a fraction of the run's calls, in [0, 1), "
                             f"got {self.stop}")
        if self.layers != ("attn1",):
            raise ValueError(f"ToDo reduces the keys and values of self-attention: layers must be "
                             f"('attn1',), got {self.layers}")

    def check_calls(self, calls):
        if round(calls * (1 - self.stop)) == 0:
            raise ValueError(f"ToDo's stop {self.stop} leaves none of this run's {calls} "
                             "UNet calls downsampled; lower it")


class KeysValues:
    """A plan that reduces only what self-attention reads keys and values from: keys_values(x)
    [B, h*w, C] -> [B, h'*w', C], the grid resized to `small`."""

    def __init__(self, hw, small, mode):
        self.hw, self.small, self.mode = hw, small, mode

    def keys_values(self, x):
        (h, w), (b, _, c) = self.hw, x.shape
        grid = x.transpose(1, 2).reshape(b, c, h, w)                 # [B, C, h, w]
        small = F.interpolate(grid, size=self.small, mode=self.mode)
        return small.flatten(2).transpose(1, 2)                      # [B, h'*w', C]
