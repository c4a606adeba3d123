"""Token pruning inside the UNet's transformer blocks: ToMe, SiTo, DaTo.

Each method module has `plan(x, (h, w), ratio, ...) -> (prune, recover)`, the contract of
tomesd's merge/unmerge: prune [B, N, C] -> [B, N-k, C] before a sub-layer, recover
[B, N-k, C'] -> [B, N, C'] after it. TokenPruning holds the settings of a run; the per-run
state (sampler/acceleration.py) asks it for plans block by block. A leaf, like cache/: it
imports no other package of this project.
"""
import math
from dataclasses import dataclass

from . import dato, sito, tome
from .dato import BASE_TOKENS
from .tokens import check_ratio, max_ratio

METHODS = ("tome", "sito", "dato")
LAYERS = ("attn1", "attn2", "ff")   # self-attention, cross-attention, feed-forward
RECOVER = ("kept", "base")
MAX_DOWNSAMPLES = (1, 2, 4, 8)   # the grid sizes below the latent that a UNet's levels have


@dataclass(frozen=True)
class TokenPruning:
    """Token pruning settings; recommended values are the defaults.

    method: "tome" | "sito" | "dato".
    ratio: fraction of a block's tokens removed (0.5; at most tokens.max_ratio(sx, sy), 0.75 for 2x2 cells).
        Quality holds up to about 0.5-0.6 (ToMe README, SiTo table); 0 disables pruning exactly.
    max_downsample: prune blocks whose grid is at most this much smaller than the latent
        (1: the five 64x64-latent blocks at 512 px, as every paper recommends; 2, 4, 8: deeper too).
    sx, sy: cell size, one base token per cell (2, 2).
    layers: sub-layers to wrap (("attn1",): self-attention only; pruning "ff" hurts images,
        SiTo #1 / tomesd README).
    noise_alpha: SiTo/DaTo noise weight on the base-token score (0.1).
    sim_beta: SiTo's SimScore weight (1.0). gamma: DaTo's dynamics weight (1.0; the official
        `diff_gema`: 1 in its COCO-30k recipe run_command9, 0.1 in its search driver).
    base_tokens: DaTo's base token per cell: "dynamics" (recommended; the method of the paper: argmax
        of gamma * D + noise_alpha * noise) or "local_random" (a random position per cell, one pattern
        for every block of a UNet call and every batch row, new each call; D, gamma, noise_alpha unused).
        "local_random" is the official code's default (apply_patch's `local_random=True`, its COCO-30k
        recipe run_command8); its other recipes and searches use dynamics.
    align_cfg: DaTo, guided runs: uncond and cond rows share base tokens (True).
    recover_from: SiTo/DaTo: pruned tokens copy the most similar "kept" token (official code)
        or "base" token (the SiTo paper; cheaper).
    use_rand: ToMe: random dst per cell (True) or top-left.
    schedule: per-UNet-call ratios, one per UNet call of the run, overriding `ratio`
        (DaTo's searched per-step ratios). Empty: constant ratio.
    """
    method: str = "sito"
    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    layers: tuple = ("attn1",)
    noise_alpha: float = 0.1
    sim_beta: float = 1.0
    gamma: float = 1.0
    align_cfg: bool = True
    recover_from: str = "kept"
    base_tokens: str = "dynamics"
    use_rand: bool = True
    schedule: tuple = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; choose one of {METHODS}")
        for field in ("noise_alpha", "sim_beta", "gamma"):
            if not math.isfinite(getattr(self, field)):
                raise ValueError(f"{field} must be a finite number, got {getattr(self, field)}")
        if self.sx < 1 or self.sy < 1:
            raise ValueError(f"cell size must be positive, got sx={self.sx}, sy={self.sy}")
        for r in (self.ratio, *self.schedule):
            check_ratio(r, self.sx, self.sy)
        if self.max_downsample not in MAX_DOWNSAMPLES:
            raise ValueError(f"max_downsample must be one of {MAX_DOWNSAMPLES}, got {self.max_downsample}")
        if not self.layers or set(self.layers) - set(LAYERS):
            raise ValueError(f"layers must be a non-empty subset of {LAYERS}, got {self.layers}")
        if self.recover_from not in RECOVER:
            raise ValueError(f"recover_from must be one of {RECOVER}, got {self.recover_from!r}")
        if self.base_tokens not in BASE_TOKENS:
            raise ValueError(f"base_tokens must be one of {BASE_TOKENS}, got {self.base_tokens!r}")
        if self.base_tokens != "dynamics" and self.method != "dato":
            raise ValueError(f"base_tokens={self.base_tokens!r} is a DaTo setting (method='dato'); "
                             f"{self.method!r} chooses its own base tokens (ToMe: random, use_rand; SiTo: SimScore)")

    def check_calls(self, calls):
        if self.schedule and len(self.schedule) != calls:
            raise ValueError(f"prune schedule has {len(self.schedule)} ratios, but this run makes {calls} UNet calls; "
                             "give one ratio per call")

    @property
    def uses_dynamics(self):
        """Whether plans need DaTo's dynamics map (dato.dynamics_map of the last two UNet outputs)."""
        return self.method == "dato" and self.base_tokens == "dynamics"

    @property
    def same_draws_per_call(self):
        """Whether every block of a UNet call must draw the same random numbers (DaTo's local_random:
        one base pattern per call, as the official code gets by re-forking the global RNG in every block)."""
        return self.method == "dato" and self.base_tokens == "local_random"

    def ratio_at(self, call):
        return self.schedule[call] if self.schedule else self.ratio

    def applies(self, hw, latent_tokens):
        """Whether a block with an h x w grid is pruned: deep enough grids only (tomesd's rule
        ds = ceil(sqrt(N_latent / N)) <= max_downsample), and at least one full cell."""
        h, w = hw
        ds = math.ceil(math.sqrt(latent_tokens / (h * w)))
        return ds <= self.max_downsample and h >= self.sy and w >= self.sx

    def plan(self, x, hw, ratio, generator=None, dynamics=None, guided=False):
        """The TokenPlan of one block; `guided`: x is a CFG batch [uncond; cond]."""
        if self.method == "tome":
            return tome.plan(x, hw, ratio, sx=self.sx, sy=self.sy, use_rand=self.use_rand, generator=generator)
        if self.method == "sito":
            return sito.plan(x, hw, ratio, sx=self.sx, sy=self.sy, noise_alpha=self.noise_alpha,
                             sim_beta=self.sim_beta, recover_from=self.recover_from, generator=generator)
        return dato.plan(x, hw, ratio, dynamics=dynamics, gamma=self.gamma, noise_alpha=self.noise_alpha,
                         align_cfg=self.align_cfg and guided, recover_from=self.recover_from, sx=self.sx, sy=self.sy,
                         base_tokens=self.base_tokens, generator=generator)


__all__ = ["TokenPruning", "METHODS", "LAYERS", "RECOVER", "MAX_DOWNSAMPLES", "BASE_TOKENS", "max_ratio",
           "tome", "sito", "dato"]
