"""evaluate.py on the shipped lab model, a few steps: the same (prompt, seed) images in every method
folder, resume redoes exactly what was deleted, changed settings are refused, bad input fails
before anything is generated, and PSNR/SSIM equal an independent computation."""
import importlib.util
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
from lab.scenes import sample_captions
from model import load_checkpoint
from sampler.generate import Sampling, generate

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "lab-sd.safetensors")

FAST = ["--ckpt", SHIPPED, "--steps", "4", "--n", "6", "--batch-size", "4", "--seed", "3", "--dtype", "fp32"]


def run(out, *extra):
    return evaluate.main([*FAST, "--out", str(out), *extra])


def files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_methods_share_prompts_and_seeds_and_results_are_complete(tmp_path):
    results = run(tmp_path, "--methods", "baseline,sito:0.5,deepcache-n3")
    assert sorted(os.listdir(tmp_path / "sito_0.5")) == [f"{k:05d}.png" for k in range(6)]
    prompts = sample_captions(6, seed="evaluate/3")
    for k in (0, 5):   # image k: prompt k, seed 3 + k, in every folder
        params = [json.loads(Image.open(tmp_path / m / f"{k:05d}.png").info["parameters"])
                  for m in ("baseline", "sito_0.5", "deepcache-n3")]
        assert {(p["prompt"], p["seed"]) for p in params} == {(prompts[k], 3 + k)}
    stored = json.load(open(tmp_path / "results.json"))["methods"]
    assert stored == json.loads(json.dumps(results))
    assert "psnr" not in stored["baseline"] and stored["baseline"]["mac_ratio"] == 1.0
    assert stored["deepcache-n3"]["mac_ratio"] > 1.5 and stored["deepcache-n3"]["psnr"] < 100
    for entry in stored.values():
        lo, hi = entry["accuracy_ci"]
        assert 0 <= lo <= entry["accuracy"] <= hi <= 1 and entry["n"] == 6 and entry["speedup"] > 0
    for name in ("results.md", "grid.png", "quality_vs_speed.png", "timing.json"):
        assert os.path.getsize(tmp_path / name) > 0


def test_baseline_images_equal_plain_generation(tmp_path):
    """A batch is fixed by the image list: images 4-5 are the second batch, seeds 7 and 8."""
    run(tmp_path, "--methods", "baseline")
    sd = load_checkpoint(SHIPPED)
    prompts = sample_captions(6, seed="evaluate/3")
    images = generate(sd, prompts[4:], Sampling(steps=4, seed=7, batch_size=4))
    for k, image in zip((4, 5), images, strict=True):
        stored = Image.open(tmp_path / "baseline" / f"{k:05d}.png")
        assert torch.equal(evaluate.pixels([image]), evaluate.pixels([stored]))


def test_resume_redoes_exactly_what_was_deleted(tmp_path):
    run(tmp_path, "--methods", "baseline,sito:0.5")
    before = {m: files(tmp_path / m) for m in ("baseline", "sito_0.5")}
    times = {name: os.stat(tmp_path / "baseline" / name).st_mtime_ns for name in before["baseline"]}
    os.remove(tmp_path / "sito_0.5" / "00005.png")
    with open(tmp_path / "baseline" / "00001.png", "r+b") as f:   # a half-written file
        f.truncate(100)
    run(tmp_path, "--methods", "baseline,sito:0.5")
    assert {m: files(tmp_path / m) for m in ("baseline", "sito_0.5")} == before
    rewritten = [n for n, t in times.items() if os.stat(tmp_path / "baseline" / n).st_mtime_ns != t]
    assert rewritten == ["00001.png"]


def test_changed_settings_are_refused(tmp_path, capsys):
    run(tmp_path, "--methods", "baseline")
    with pytest.raises(SystemExit):
        evaluate.main([*FAST[:3], "5", *FAST[4:], "--out", str(tmp_path), "--methods", "baseline"])
    assert "steps differ" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--methods", "baseline,sito:0.5,foo"], "unknown method 'foo'"),
    (["--methods", "baseline,dato-coco"], "use --sampler plms --steps 50"),
    (["--methods", "baseline", "--prompts", "missing.txt"], "does not exist"),
    (["--methods", "baseline", "--n", "0"], "--n must be >= 1"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        run(tmp_path / "out", *args)
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_missing_metric_library_fails_before_generating(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchmetrics" else real(name, *a))
    with pytest.raises(SystemExit):
        run(tmp_path / "out", "--methods", "baseline,sito:0.5")
    assert "requirements-eval.txt" in capsys.readouterr().err and not (tmp_path / "out").exists()


def reference_ssim(x, y, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM as Wang et al. (2004) define it: Gaussian-weighted local statistics, per channel, mean over
    the valid region (no padding)."""
    g = torch.exp(-(torch.arange(window, dtype=torch.float64) - window // 2) ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).outer(g / g.sum()).expand(x.shape[1], 1, window, window)

    def blur(t):
        return F.conv2d(t, g, groups=x.shape[1])
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = k1 ** 2, k2 ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def test_psnr_and_ssim_equal_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 3, 48, 48, generator=g)
    other = (base + 0.1 * torch.randn(base.shape, generator=g)).clamp(0, 1)
    to_pil = lambda t: [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in t]  # noqa: E731
    a, b = to_pil(other), to_pil(base)
    x, y = evaluate.pixels(a), evaluate.pixels(b)
    psnr = (10 * torch.log10(1 / (x - y).pow(2).mean(dim=(1, 2, 3)))).mean().item()
    ours = evaluate.fidelity(a, b)
    assert ours["psnr"] == pytest.approx(psnr, rel=1e-6)
    assert ours["ssim"] == pytest.approx(reference_ssim(x, y).mean().item(), abs=2e-3)
    assert evaluate.fidelity(b, b)["psnr"] == 100.0


def test_bootstrap_interval():
    assert evaluate.bootstrap_interval([1] * 20) == [1.0, 1.0]
    lo, hi = evaluate.bootstrap_interval([1, 0] * 200)
    half = 1.96 * math.sqrt(0.25 / 400)
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)
