"""Regional compilation (model/compile.py): every method runs on the compiled UNet with the eager results, within
a bounded number of graphs, and a second run of the same settings compiles nothing (dynamo's own count). The
default suite compiles with a debugging backend (aot_eager: dynamo's graphs and AOTAutograd, no code
generation); the inductor check is slow."""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from accel import Acceleration, Gate, Guidance, Skip
from cache import FULL, CacheSchedule
from conftest import tiny_unet
from model.compile import GRAPHS_PER_SHAPE, compile_unet, compiled_graphs, layer_shapes
from prune import token_method
from sampler import sample

HW = (32, 32)   # a latent at which every token method acts on the tiny UNet's top blocks

METHODS = {
    "baseline": None,
    "deepcache depth 2": Acceleration(cache=CacheSchedule("uniform", interval=3, depth=2)),
    "dato depths, forecast": Acceleration(cache=CacheSchedule("dato", depths=(FULL, 1, 0, FULL, 2, FULL), order=1)),
    "tome": Acceleration(prune=token_method("tome", ratio=0.5)),
    "sito": Acceleration(prune=token_method("sito", ratio=0.5)),
    "dato dynamics": Acceleration(prune=token_method("dato", ratio=0.5)),
    "dato local_random + cache": Acceleration(prune=token_method("dato", ratio=0.4, base_tokens="local_random"),
                                              cache=CacheSchedule("uniform", interval=2, depth=1)),
    "todo": Acceleration(prune=token_method("todo", factor=2)),
    "guidance window, reuse, skip": Acceleration(guidance=Guidance(window=(3.0, 20.0), outside="reuse"),
                                                 skip=Skip((3,))),
    "t-gate": Acceleration(gate=Gate(3)),
    "adaptive guidance": Acceleration(guidance=Guidance(stop=0.5)),
}


def inputs(unet, rows=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4, *HW, generator=g)
    cond, uncond = (torch.randn(rows, 77, unet.config.context_dim, generator=g) for _ in range(2))
    return x, cond, uncond


def run(unet, accel, x, cond, uncond):
    return sample(unet, x, cond, uncond, steps=6, scale=7.5, method="dpmpp-2m", accel=accel)


def test_every_method_runs_compiled_as_eager_and_a_second_run_compiles_nothing():
    """One compiled UNet for every method, as a process that compiles once: the first pass compiles each layer
    shape (at most GRAPHS_PER_SHAPE graphs each), the second pass compiles no graph and every output equals the
    eager one within 1e-4."""
    eager = tiny_unet()
    unet = compile_unet(copy.deepcopy(eager), backend=CompileCounterWithBackend("eager"))
    with torch.inference_mode():   # as generate() runs: inference tensors throughout
        x, cond, uncond = inputs(eager)
        for accel in METHODS.values():
            if accel is not None:
                accel.check_unet(eager, HW, 6, 4)   # each method acts on this UNet (a token method on a block)
        expected = {name: run(eager, accel, x, cond, uncond) for name, accel in METHODS.items()}
        before = compiled_graphs()
        for name, accel in METHODS.items():
            out = run(unet, accel, x, cond, uncond)
            assert ((out - expected[name]).abs().max() / expected[name].abs().max()).item() <= 1e-4, name
        warm = compiled_graphs() - before
        assert 0 < warm <= GRAPHS_PER_SHAPE * len(layer_shapes(unet))
        for name, accel in METHODS.items():
            assert torch.allclose(run(unet, accel, x, cond, uncond), expected[name], rtol=1e-4, atol=1e-5), name
        assert compiled_graphs() - before == warm   # no recompiles after warm-up


def test_a_single_image_and_other_batches_reuse_the_graphs():
    """Batches of 1 (dynamo specialises size 1) compile at most one more graph per layer shape; a run with
    another batch size after both compiles nothing."""
    eager = tiny_unet()
    unet = compile_unet(copy.deepcopy(eager), backend="eager")
    with torch.inference_mode():
        x, cond, uncond = inputs(eager, rows=3)
        for rows in (1, 2):
            run(unet, METHODS["guidance window, reuse, skip"], x[:rows], cond[:rows], uncond[:rows])
        before = compiled_graphs()
        out = run(unet, METHODS["guidance window, reuse, skip"], x, cond, uncond)
        assert compiled_graphs() == before
        assert torch.allclose(out, run(eager, METHODS["guidance window, reuse, skip"], x, cond, uncond),
                              rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_methods_equal_eager():
    eager = tiny_unet()
    unet = compile_unet(copy.deepcopy(eager))
    with torch.inference_mode():
        x, cond, uncond = inputs(eager)
        for name in ("baseline", "sito", "deepcache depth 2", "t-gate"):
            want, got = run(eager, METHODS[name], x, cond, uncond), run(unet, METHODS[name], x, cond, uncond)
            assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4, name


@pytest.mark.slow
def test_sample_compile_reports_its_warm_up_apart(tmp_path, capsys, tokenizer_dir):
    import sample
    sample.main(["--prompt", "a red cube", "--random-weights", "tiny", "--H", "32", "--W", "32", "--steps", "3",
                 "--tokenizer", tokenizer_dir, "--compile", "--outdir", str(tmp_path)])
    assert "compile and warm-up" in capsys.readouterr().out and (tmp_path / "00000.png").exists()
