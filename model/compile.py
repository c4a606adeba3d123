"""Regional compilation: torch.compile on the UNet's repeated layers, so that every acceleration
method runs compiled without recompiling.

    from model.compile import compile_unet
    compile_unet(sd.unet)   # in place; the first run with given settings compiles (warm-up)

A whole-UNet graph breaks or recompiles on every new call kind (cached calls skip blocks, token
selection reads the data, each pruned block sees its own token count: docs/loading.md), so only the
ResBlocks, attentions and feed-forwards are compiled (nn.Module.compile, in place, every input
dimension dynamic), and what decides a call's plan (cache depth, token selection, guidance, the
gate) stays in eager Python around them, touching no compiled state. One graph per layer shape
then serves every ratio, batch and cache depth; a second run with the same settings compiles
nothing (docs/benchmarks.md).

dynamo keeps at most `recompile_limit` graphs per code object (8 by default; the layers of one
class share theirs), fewer than SD's 12 ResBlock shapes: compile_unet raises it, process-wide, to
what this UNet needs, GRAPHS_PER_SHAPE per distinct layer shape: batch 1 (dynamo specialises size
1) or more, and for self-attention separate keys and values (ToDo).
"""
import torch
import torch._dynamo.config
import torch._dynamo.utils

from .unet import CrossAttention, FeedForward, ResBlock

COMPILED = (ResBlock, CrossAttention, FeedForward)
GRAPHS_PER_SHAPE = 4   # batch 1 or more, times keys and values from the queries or given (ToDo)


def layer_shapes(unet):
    """The distinct (layer class, parameter shapes) of the layers compile_unet compiles."""
    return {(type(m).__name__, tuple(tuple(p.shape) for p in m.parameters()))
            for m in unet.modules() if isinstance(m, COMPILED)}


def compile_unet(unet, backend="inductor", mode=None):
    """Compile every ResBlock, CrossAttention and FeedForward of `unet` in place, dynamic shapes.
    backend: "inductor" (torch's compiler; the fast one) or a debugging one ("eager", "aot_eager").
    mode: inductor's mode (None; "max-autotune" searches kernels for longer). Returns `unet`."""
    limit = GRAPHS_PER_SHAPE * len(layer_shapes(unet))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for module in unet.modules():
        if isinstance(module, COMPILED):
            module.compile(backend=backend, mode=mode, dynamic=True)
    return unet


def compiled_graphs():
    """Graphs torch.compile has compiled in this process so far (dynamo's count): a run that adds
    none recompiled nothing."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]
