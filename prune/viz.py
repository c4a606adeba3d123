"""Pictures of token plans, for teaching: which tokens of one block were base, kept or pruned."""
import itertools
import os
from dataclasses import dataclass

import torch
from PIL import Image

COLORS = torch.tensor([[200, 200, 200],   # kept: light grey
                       [220, 40, 40],     # base (ToMe: dst): red
                       [30, 30, 30]],     # pruned (ToMe: merged): black
                      dtype=torch.uint8)


@dataclass(frozen=True)
class PruneViz:
    """Save one PNG per UNet call showing the plan of one block.

    folder: where the PNGs go (created); block: the transformer block, by module name;
    row: batch row to show (-1: the last, a conditional image); cell: pixels per token.
    """
    folder: str
    block: str = "input_blocks.1.1.transformer_blocks.0"
    row: int = -1
    cell: int = 4

    def record(self, tag, block, hw, plan):
        if block != self.block:
            return
        roles = plan.roles()[self.row].view(*hw).cpu().long()
        pixels = COLORS[roles].repeat_interleave(self.cell, 0).repeat_interleave(self.cell, 1)
        os.makedirs(self.folder, exist_ok=True)
        for n in itertools.count():   # never overwrite an earlier picture
            try:
                with open(os.path.join(self.folder, f"{tag}{f'_{n}' if n else ''}.png"), "xb") as f:
                    return Image.fromarray(pixels.numpy()).save(f, format="PNG")
            except FileExistsError:
                continue

    def __post_init__(self):
        if not isinstance(self.folder, str) or not self.folder:
            raise ValueError(f"folder must name a folder for the pictures, got {self.folder!r}")
        if not isinstance(self.block, str):
            raise ValueError(f"block must be a transformer block's module name, "
                             f"got {self.block!r}")
        for name, value, least in (("row", self.row, None), ("cell", self.cell, 1)):
            if (isinstance(value, bool) or not isinstance(value, int)
                    or least is not None and value < least):
                raise ValueError(f"PruneViz {name} must be a whole number"
                                 f"{f' >= {least}' if least else ''}, got {value!r}")
