"""What every token method shares: the settings that say where it acts, and the plan contract.

A token method is one frozen dataclass (its settings, recommended values as defaults) with a
`plan` for one transformer block. The run state (accel/run.py) asks for plans block by block:

    plan = method.plan(x, hw, ratio, generator=g, dynamics=D, guided=True)

and hands them to the block (model/unet.py, run_with_plan). A plan is one of two kinds:
- `reduces = "tokens"` (ToMe, SiTo, DaTo): `prune, recover = plan`, the contract of tomesd's
  merge/unmerge: prune [B, N, C] -> [B, N-k, C] before a sub-layer, recover [B, N-k, C'] ->
  [B, N, C'] after it;
- `reduces = "keys_values"` (ToDo): `plan.keys_values(x)` [B, N, C] -> [B, M, C], the tokens
  self-attention takes its keys and values from; queries and the output grid stay whole.

A field declared with `setting(...)` is also a command-line flag (sample.py's `--prune-NAME`),
so a new method's options reach the tools without editing them.
"""
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import torch

from .tokens import RECOVER, check_ratio

LAYERS = ("attn1", "attn2", "ff")   # self-attention, cross-attention, feed-forward
MAX_DOWNSAMPLES = (1, 2, 4, 8)   # how much smaller than the top transformer level's a grid is


# a field's declared type -> (what its value must be an instance of, how an error names it)
KINDS = {int: (numbers.Integral, "a whole number"), float: (numbers.Real, "a number"),
         bool: (bool, "True or False"), str: (str, "text"), tuple: (tuple, "a tuple")}


def setting(default, flag, help, type=None, choices=None):
    """A settings field that is also sample.py's flag --prune-`flag` (help: its use, default)."""
    return field(default=default,
                 metadata={"flag": flag, "help": help, "type": type, "choices": choices})


def comma_list(text):
    return tuple(text.split(","))


@dataclass(frozen=True)
class TokenMethod:
    """Where a token method acts; recommended values are the defaults.

    max_downsample: act on blocks whose grid is at most this much smaller than the UNet's top
        transformer level's (1, the papers' choice: SD's 64x64 blocks at 512 px, SDXL's at 1024
        px; 2, 4, 8: deeper too).
    layers: the sub-layers of each block it wraps, from LAYERS (("attn1",): self-attention only;
        pruning "ff" hurts images).
    """
    name: ClassVar[str] = ""            # the registry's key: --prune NAME, NAME:VALUE in --methods
    spec_field: ClassVar[str] = "ratio"   # the field VALUE sets in a NAME:VALUE method spec
    reduces: ClassVar[str] = "tokens"     # the kind of plan (module docstring)

    max_downsample: int = setting(1, "maxdown", "act on blocks at most this much below the top "
                                  "transformer level (1: SD's five 64x64 blocks at 512 px)", int,
                                  MAX_DOWNSAMPLES)
    layers: tuple = setting(("attn1",), "layers",
                            f"comma-separated sub-layers from {','.join(LAYERS)} "
                            "(attn1 = self-attention only)", comma_list)

    def start(self, stream):
        """This method's state for one sampling run (TokenRun), its random numbers drawn from the
        seeds stream(name) (the run's named streams, sampler.stream_seed)."""
        return TokenRun(self, stream)

    def ratio_at(self, call, calls):
        """The fraction of a wrapped sub-layer's tokens (ToDo: of its keys and values) removed on
        UNet call `call` of a run of `calls`; 0: the method is off for that call."""
        raise NotImplementedError

    def every_call(self, ratio):
        """These settings acting at `ratio` on every call (bench.py times one call of each kind)."""
        raise NotImplementedError

    def applies(self, hw, downsamples):
        """Whether a block with an h x w grid, `downsamples` x2 downsamplings below the UNet's top
        transformer level, is acted on: 2**downsamples <= max_downsample (tomesd's rule, counted
        from the top transformer level so 1 is SD's 64x64 blocks at 512 px and SDXL's at 1024 px),
        and the grid is big enough for the method."""
        return 2 ** downsamples <= self.max_downsample and self.fits(hw)

    def fits(self, hw):
        return True

    def tokens_into(self, sub, hw, ratio):
        """How many tokens enter `sub` ("attn1", "kv1": the tokens attn1 takes keys/values from,
        "attn2", "ff") of an acted-on block at `ratio`: for analytic MACs (model/macs.py)."""
        n = hw[0] * hw[1]
        return n - int(n * ratio) if (sub if sub != "kv1" else "attn1") in self.layers else n

    def plan(self, x, hw, ratio, generator=None, dynamics=None, guided=False):
        """The plan of one block on input x [B, h*w, C]; `guided`: x is [uncond; cond] (CFG)."""
        raise NotImplementedError

    def __post_init__(self):
        for f in fields(self):   # every field's generic checks; subclasses add their own
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if f.type is tuple and isinstance(value, list):   # JSON's arrays mean tuples
                object.__setattr__(self, f.name, value := tuple(value))
            if f.type in KINDS and (not isinstance(value, KINDS[f.type][0]) or
                                    f.type is not bool and isinstance(value, bool)):
                raise ValueError(f"{f.name} must be {KINDS[f.type][1]}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")
        if not self.layers or set(self.layers) - set(LAYERS):
            raise ValueError(f"layers must be a non-empty subset of {LAYERS}, got {self.layers}")

    def check_calls(self, calls):
        """Raise ValueError if per-call settings do not fit a run of `calls` UNet calls."""


class TokenRun:
    """A token method's state across the UNet calls of one run: its random stream, on the
    latent's device (a CPU draw copied to a GPU would sync every block). The run state (accel/)
    begins each call on it with the call's latent and the last two raw UNet outputs, and asks it
    for plans. A method that needs more across calls (DaTo's dynamics) subclasses it."""

    def __init__(self, method, stream):
        self.method, self.stream, self.generator = method, stream, None

    def begin_call(self, call, x, outputs):
        """UNet call `call` on latent batch x [B, c, h, w] is about to run; outputs: the two most
        recent raw UNet outputs, oldest first (None before there are two)."""
        if self.generator is None:
            self.generator = torch.Generator(x.device).manual_seed(self.stream("accel"))

    def plan(self, x, hw, ratio, guided):
        return self.method.plan(x, hw, ratio, generator=self.generator, guided=guided)


@dataclass(frozen=True)
class CellMethod(TokenMethod):
    """A method that keeps one base token per sy x sx cell and removes the tokens most like them
    (ToMe, SiTo, DaTo; prune/tokens.py).

    ratio: fraction of a block's tokens removed (0.5; at most tokens.max_ratio(sx, sy), 0.75 for
        2x2 cells). Quality holds up to about 0.5-0.6; 0 disables it exactly.
    sx, sy: cell size, one base token per cell (2, 2).
    schedule: one ratio per UNet call of the run, overriding `ratio` (DaTo's searched per-step
        ratios). Empty: the constant ratio.
    """
    ratio: float = setting(0.5, "ratio", "fraction of tokens removed per block "
                           "(0.5, at most 0.75 with 2x2 cells)", float)
    sx: int = 2
    sy: int = 2
    schedule: tuple = ()

    def ratio_at(self, call, calls):
        return self.schedule[call] if self.schedule else self.ratio

    def every_call(self, ratio):
        return replace(self, ratio=ratio, schedule=())

    def fits(self, hw):
        return hw[0] >= self.sy and hw[1] >= self.sx   # at least one full cell

    def __post_init__(self):
        super().__post_init__()
        if self.sx < 1 or self.sy < 1:
            raise ValueError(f"cell size must be positive, got sx={self.sx}, sy={self.sy}")
        for r in (self.ratio, *self.schedule):
            check_ratio(r, self.sx, self.sy)

    def check_calls(self, calls):
        if self.schedule and len(self.schedule) != calls:
            raise ValueError(f"prune schedule has {len(self.schedule)} ratios, but this run makes "
                             f"{calls} UNet calls; give one ratio per call")


@dataclass(frozen=True)
class RecoveringMethod(CellMethod):
    """SiTo and DaTo: base tokens scored with a little noise, pruned tokens restored from a kept
    or a base token.

    noise_alpha: noise weight on the base-token score, so the same tokens are not pruned at every
        step (0.1).
    recover_from: pruned tokens copy the most similar "kept" token (official code; recommended)
        or "base" token (paper; cheaper).
    """
    noise_alpha: float = setting(0.1, "noise", "SiTo/DaTo noise weight on the base-token score "
                                 "(0.1)", float)
    recover_from: str = setting("kept", "recover", "SiTo/DaTo: pruned tokens copy the most similar "
                                "kept token (official code, default) or base token (paper)",
                                choices=RECOVER)

    def __post_init__(self):
        super().__post_init__()
        if self.noise_alpha < 0:   # a weight: negative noise is noise too, the score's sign turned
            raise ValueError(f"noise_alpha must be >= 0, got {self.noise_alpha}")
