"""evaluate.py on the shipped lab model, a few steps: the same (prompt, seed) images in every method
folder, resume redoes exactly what was deleted, changed settings are refused, bad input fails
before anything is generated, and PSNR/SSIM equal an independent computation."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from lab.scenes import sample_captions
from model import load_checkpoint
from sampler.generate import Sampling, from_pil, generate
from tools import evaluate

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "lab-sd.safetensors")

FAST = ["--ckpt", SHIPPED, "--steps", "4", "--n", "6", "--batch-size", "4", "--seed", "3", "--dtype", "fp32"]


def run(out, *extra):
    return evaluate.main([*FAST, "--out", str(out), *extra])


def files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_methods_share_prompts_and_seeds_and_results_are_complete(tmp_path):
    results = run(tmp_path, "--methods", "baseline,sito:0.5,deepcache-n3")
    assert sorted(os.listdir(tmp_path / "sito_0.5")) == [f"{k:05d}.png" for k in range(6)] + ["settings.json"]
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
        assert torch.equal(from_pil([image]), from_pil([stored]))


def test_resume_redoes_exactly_what_was_deleted(tmp_path):
    run(tmp_path, "--methods", "baseline,sito:0.5")
    before = {m: files(tmp_path / m) for m in ("baseline", "sito_0.5")}
    times = {name: os.stat(tmp_path / "baseline" / name).st_mtime_ns for name in before["baseline"]}
    os.remove(tmp_path / "sito_0.5" / "00005.png")
    with open(tmp_path / "baseline" / "00001.png", "r+b") as f:   # a half-written file
        f.truncate(100)
    (tmp_path / "sito_0.5" / "00002.png.tmp").write_bytes(b"half")   # left by a killed run
    speedup = json.load(open(tmp_path / "results.json"))["methods"]["sito:0.5"]["speedup"]
    run(tmp_path, "--methods", "baseline,sito:0.5")
    assert {m: files(tmp_path / m) for m in ("baseline", "sito_0.5")} == before
    rewritten = [n for n, t in times.items() if os.stat(tmp_path / "baseline" / n).st_mtime_ns != t]
    assert rewritten == ["00001.png"]
    # the repair timed baseline's batch 0 and sito's batch 4 in a new run: the first run's pairs still stand
    timing = json.load(open(tmp_path / "timing.json"))
    assert not (tmp_path / "sito_0.5" / "00002.png.tmp").exists()
    assert [len(timing["baseline"][b]) for b in ("0", "4")] == [2, 1]
    assert [len(timing["sito:0.5"][b]) for b in ("0", "4")] == [1, 2]
    assert json.load(open(tmp_path / "results.json"))["methods"]["sito:0.5"]["speedup"] == speedup


def test_changed_settings_are_refused(tmp_path, capsys):
    run(tmp_path, "--methods", "baseline")
    with pytest.raises(SystemExit):
        evaluate.main([*FAST[:3], "5", *FAST[4:], "--out", str(tmp_path), "--methods", "baseline"])
    assert "steps differ" in capsys.readouterr().err


def test_a_folder_knows_its_weights_by_content_not_by_path(tmp_path, capsys):
    """Other weights at the same path are refused (their images would be scored beside the old ones); the
    same file under another spelling resumes; a folder recorded with the path (before content ids) too."""
    weights = tmp_path / "w"
    weights.mkdir()
    shutil.copy(SHIPPED, weights / "lab.safetensors")
    shutil.copytree(os.path.join(os.path.dirname(SHIPPED), "tokenizer"), weights / "tokenizer")
    out, flags = tmp_path / "out", ["--steps", "2", "--n", "2", "--batch-size", "2", "--dtype", "fp32",
                                    "--methods", "baseline", "--out", str(tmp_path / "out")]
    evaluate.main(["--ckpt", str(weights / "lab.safetensors"), *flags])
    settings = json.load(open(out / "settings.json"))
    assert settings["checkpoint"].startswith("sha256:")
    before = files(out / "baseline")
    evaluate.main(["--ckpt", f"{weights}/./lab.safetensors", *flags])
    assert files(out / "baseline") == before
    json.dump({**settings, "checkpoint": str(weights / "lab.safetensors")}, open(out / "settings.json", "w"))
    evaluate.main(["--ckpt", str(weights / "lab.safetensors"), *flags])   # recorded by path: still resumes
    with open(weights / "lab.safetensors", "r+b") as f:   # other weights at the same path: one value changed
        f.seek(-2, os.SEEK_END)
        last = f.read(2)
        f.seek(-2, os.SEEK_END)
        f.write(bytes([last[0] ^ 1, last[1]]))
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", str(weights / "lab.safetensors"), *flags])
    assert "checkpoint differ" in capsys.readouterr().err and files(out / "baseline") == before


@pytest.mark.parametrize("args, message", [
    (["--methods", "baseline,sito:0.5,foo"], "unknown method 'foo'"),
    (["--methods", "baseline,dato-coco"], "run it with sampler plms and 50 steps (in --methods: dato-coco@plms:50)"),
    (["--methods", "baseline", "--prompts", "missing.txt"], "does not exist"),
    (["--methods", "baseline", "--n", "0"], "--n must be >= 1"),
    (["--methods", "baseline", "--n", "1"], "Fréchet distances (fd_lab) compare two sets"),
    (["--methods", "baseline", "--out", ""], "--out is empty; name a folder"),
    (["--methods", "baseline", "--out", "tests"], "--out 'tests' holds other files and no settings.json"),
    (["--methods", "baseline", "--prompts", "requirements.txt", "--n", "1000"], "--n 1000: --prompts requirements"),
    (["--methods", "baseline", "--workers", "1000"], "--workers must be from 1 to this machine's"),
    (["--methods", "baseline", "--fid-ref", "README.md"], "--fid-ref 'README.md' is not an .npz of statistics"),
    (["--methods", "baseline", "--lab-features", "lab/lab-sd.safetensors"], "is not a lab feature network"),
    (["--methods", "baseline", "--lab-features", "runs/truncated.safetensors"], "does not exist"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        run(tmp_path / "out", *args)
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_prompts_that_mix_lab_captions_with_other_lines_are_refused(tmp_path, capsys):
    """One typo among lab captions would drop accuracy and lab FD for the whole run: refused, as lab.check
    refuses such a captions.txt; prompts with no lab caption at all are measured without them, said once."""
    (tmp_path / "t.txt").write_text("a red circle\na blue square\na red circel\n")
    with pytest.raises(SystemExit):
        run(tmp_path / "out", "--methods", "baseline,sito:0.5", "--prompts", str(tmp_path / "t.txt"), "--n", "3")
    err = capsys.readouterr().err
    assert "prompt 3, 'a red circel', is not a lab caption" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    evaluate.check_captions(["a photo of a cat", "a dog"], "--prompts coco.txt")
    assert "accuracy and lab FD are not measured" in capsys.readouterr().out


SMALL = ["--ckpt", SHIPPED, "--steps", "2", "--n", "2", "--batch-size", "2", "--H", "32", "--W", "32",
         "--dtype", "fp32", "--methods", "baseline,sito:0.5"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A small finished run (2 images x 2 methods at 32x32) for the tests that damage a copy of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    evaluate.main([*SMALL, "--out", str(out)])
    return out


def tree(folder):
    """{relative path: bytes, or None for a folder} of everything under `folder`."""
    found = {}
    for root, dirs, names in os.walk(folder):
        found.update({os.path.relpath(os.path.join(root, d), folder): None for d in dirs})
        found.update({os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), "rb").read()
                      for n in names})
    return found


@pytest.mark.parametrize("damaged, content, message", [
    ("timing.json", '{"baseline": {"0": [{"run": "a', "timing.json cannot be read as JSON"),
    ("timing.json", "[1, 2]", "timing.json is not an object of methods' timings"),
    ("timing.json", '{"baseline": {"0": [{"run": "a"}]}}', "the timings of 'baseline' are not per-batch lists"),
    ("timing.json", None, "timing.json is a folder"),
    ("baseline/00001.png", None, "00001.png is a folder"),
    ("results.json", None, "results.json is a folder"),
    ("sito_0.5", "x", "sito_0.5 is a file where a folder of results is kept"),
])
def test_damaged_files_of_a_finished_run_are_one_line_before_rendering(finished, tmp_path, capsys, damaged, content,
                                                                       message):
    """A damaged timing.json, or a folder where an image or results.json is written (a file where a method's
    folder is): one line naming it, before the missing image 00000.png is rendered again."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    os.remove(out / "baseline" / "00000.png")
    path = out / damaged
    if path.is_dir():
        shutil.rmtree(path)
    else:
        os.remove(path)
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    before = tree(out)
    with pytest.raises(SystemExit):
        evaluate.main([*SMALL, "--out", str(out)])
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err
    assert tree(out) == before


def test_an_unreadable_reference_image_is_named_before_rendering(finished, tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(finished / "baseline" / "00000.png", ref / "a.png")
    (ref / "b.png").write_bytes((finished / "baseline" / "00001.png").read_bytes()[:100])   # truncated
    with pytest.raises(SystemExit):
        evaluate.main([*SMALL, "--fid-ref", str(ref), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"{ref / 'b.png'} is not a readable image" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_damaged_settings_record_is_named(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "settings.json").write_text('{"checkpoint": ')   # cut off
    with pytest.raises(SystemExit):
        run(tmp_path / "out", "--methods", "baseline")
    err = capsys.readouterr().err
    assert "settings.json cannot be read as JSON" in err and "choose another --out" in err
    assert len(err.splitlines()) == 1


def test_truncated_lab_features_are_one_line(tmp_path, capsys):
    truncated = tmp_path / "features.safetensors"
    truncated.write_bytes(open(os.path.join(os.path.dirname(SHIPPED), "lab-features.safetensors"), "rb").read(99999))
    with pytest.raises(SystemExit):
        run(tmp_path / "out", "--methods", "baseline", "--lab-features", str(truncated))
    err = capsys.readouterr().err
    assert "cannot be read as a lab feature network (damaged or truncated" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_metric_library_fails_before_generating(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchmetrics" else real(name, *a))
    with pytest.raises(SystemExit):
        run(tmp_path / "out", "--methods", "baseline,sito:0.5")
    assert "requirements-eval.txt" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """torchrun with 2 gloo processes: the same image files and the same metrics as one process (3 batches,
    so the split is uneven; the same thread count, so the same arithmetic)."""
    args = [*FAST[:4], "--num-prompts", "6", "--batch-size", "2", "--seed", "3", "--dtype", "fp32", "--threads", "1",
            "--methods", "baseline,sito:0.5,deepcache-n3"]
    root = os.path.join(os.path.dirname(SHIPPED), "..")
    subprocess.run([sys.executable, "-m", "tools.evaluate", *args, "--out", str(tmp_path / "one")], check=True,
                   timeout=600, cwd=root)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "tools.evaluate", *args, "--out", str(tmp_path / "two")], check=True, timeout=600, cwd=root)
    for method in ("baseline", "sito_0.5", "deepcache-n3"):
        assert files(tmp_path / "one" / method) == files(tmp_path / "two" / method)
    one, two = (json.load(open(tmp_path / run / "results.json"))["methods"] for run in ("one", "two"))
    for entry in (*one.values(), *two.values()):
        assert entry.pop("speedup") > 0
    assert one == two and "fd_lab_vs_baseline" in one["sito:0.5"] and "fd_lab" in one["baseline"]


@pytest.mark.parametrize("flag, message", [
    (["--lpips"], "--lpips needs torchvision's AlexNet weights"),
    (["--inception", "missing.pth"], "--inception 'missing.pth' does not exist"),
    (["--clip", "/no/such/clip"], "--clip '/no/such/clip': no CLIP model there"),
])
def test_missing_metric_weights_fail_before_generating(tmp_path, capsys, monkeypatch, flag, message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit):
        run(tmp_path / "out", "--methods", "baseline,sito:0.5", *flag)
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_fid_reference_folder_and_statistics(tmp_path):
    """--fid-ref: a folder holding the baseline's own images, or their mu and sigma, is at distance 0 from
    the baseline; the default lab reference (the generator's scenes for the same captions) is not."""
    import numpy as np
    default = run(tmp_path / "a", "--methods", "baseline")["baseline"]["fd_lab"]
    folder = run(tmp_path / "b", "--methods", "baseline", "--fid-ref", str(tmp_path / "a" / "baseline"))
    features = torch.cat([net_features(tmp_path / "a" / "baseline")]).double()
    np.savez(tmp_path / "ref.npz", mu=features.mean(0).numpy(), sigma=torch.cov(features.T).numpy())
    stats = run(tmp_path / "c", "--methods", "baseline", "--fid-ref", str(tmp_path / "ref.npz"))
    assert default > 1 and abs(folder["baseline"]["fd_lab"]) < 1e-3 and abs(stats["baseline"]["fd_lab"]) < 1e-3


def net_features(folder):
    from lab.features import load
    images = [Image.open(os.path.join(folder, name)) for name in sorted(os.listdir(folder)) if name.endswith(".png")]
    with torch.no_grad():
        return load(evaluate.LAB_FEATURES_FILE)(from_pil(images))


def test_methods_on_their_own_runs_share_images_and_reference(tmp_path):
    """SPEC@SAMPLER:STEPS: each method on its own sampler and step count, image k on prompt k and noise
    seed --seed + k as every other method; the command's run (PLMS-4, 5 UNet calls) is the reference
    of mac_ratio and of the paired test."""
    specs = "baseline,baseline@plms:2,baseline@dpmpp-2m:3,deepcache-n3@dpmpp-2m-karras:4"
    results = run(tmp_path / "mixed", "--methods", specs)
    run(tmp_path / "plms2", "--methods", "baseline", "--steps", "2")
    for k in range(6):   # baseline@plms:2 is the baseline of a --steps 2 run, pixel for pixel
        ours = Image.open(tmp_path / "mixed" / "baseline_plms_2" / f"{k:05d}.png")
        assert torch.equal(from_pil([ours]), from_pil([Image.open(tmp_path / "plms2" / "baseline" / f"{k:05d}.png")]))
        params = json.loads(ours.info["parameters"])
        assert (params["sampler"], params["steps"], params["seed"]) == ("plms", 2, 3 + k)
    dpm = json.loads(Image.open(tmp_path / "mixed" / "baseline_dpmpp-2m_3" / "00000.png").info["parameters"])
    assert (dpm["sampler"], dpm["steps"]) == ("dpmpp-2m", 3)
    assert results["baseline@plms:2"]["mac_ratio"] == pytest.approx(5 / 3)
    assert results["baseline@dpmpp-2m:3"]["mac_ratio"] == pytest.approx(5 / 3)
    assert results["deepcache-n3@dpmpp-2m-karras:4"]["mac_ratio"] > 5 / 4
    base = results["baseline"]
    assert "vs_baseline" not in base
    for spec in specs.split(",")[1:]:
        r, test = results[spec], results[spec]["vs_baseline"]
        assert r["steps"] == int(spec[-1]) and 0 < test["p"] <= 1
        assert test["wins"] - test["losses"] == round((r["accuracy"] - base["accuracy"]) * 6)
    record = json.load(open(tmp_path / "mixed" / "baseline_dpmpp-2m_3" / "settings.json"))
    assert (record["sampler"], record["steps"]) == ("dpmpp-2m", 3)
    assert "McNemar" in open(tmp_path / "mixed" / "results.md").read()


@pytest.mark.parametrize("spec, message", [
    ("baseline@heun:20", "after '@' give SAMPLER:STEPS"), ("baseline@plms", "after '@' give SAMPLER:STEPS"),
    ("baseline@ddim:0", "method 'baseline@ddim:0': the step count after 'ddim:' must be a whole number"),
    ("dato-coco@dpmpp-2m:20", "is for PLMS-50")])
def test_bad_method_runs_are_refused_before_loading(tmp_path, capsys, spec, message):
    with pytest.raises(SystemExit):
        run(tmp_path, "--methods", f"baseline,{spec}")
    assert message in capsys.readouterr().err and not os.path.exists(tmp_path / "settings.json")


def test_method_folders_written_before_the_registry_resume():
    """A folder's settings.json from before token methods were a registry listed every method's fields
    under "prune"; it is read in today's form, and a real difference is still refused."""
    from accel import PRESETS
    today = json.loads(json.dumps(PRESETS["dato-coco"].acceleration().record()))
    old = {**today, "prune": {**today["prune"], "sim_beta": 1.0, "use_rand": True}}
    assert evaluate.upgrade_record({"acceleration": old}) == {"acceleration": today}
    changed = {**today, "prune": {**today["prune"], "sim_beta": 1.0, "use_rand": True, "ratio": 0.5}}
    assert evaluate.upgrade_record({"acceleration": changed})["acceleration"] != today


def test_the_grid_wraps_a_long_method_label_inside_its_column():
    """Every glyph of a schedule file's spec is drawn in the label column (it used to run under the images)."""
    from PIL import ImageDraw

    from tools.plots import draw_grid
    spec, white = "lab/schedules/plan-search-dpmpp-2m-20.json#0@dpmpp-2m:20", Image.new("RGB", (64, 64), "white")
    column = draw_grid({spec: [white]}, ["a red circle"], label=110).crop((0, 0, 110, 24 + 128)).convert("L")
    wide = Image.new("L", (1000, 20), 255)
    ImageDraw.Draw(wide).text((0, 0), spec, fill=0)
    ink = lambda im: int((torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8) < 128).sum())   # noqa: E731
    assert ink(column) == ink(wide) > 0
