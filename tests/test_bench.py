"""bench.py end to end on the TINY architecture: runs in seconds, writes sensible JSON, and
refuses bad input before any timing."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

from accel import Acceleration, Guidance, Skip
from model.checkpoint import ARCHITECTURES
from tools import bench
from tools.specs import schedule_entry

ROOT = Path(__file__).resolve().parent.parent

QUICK = ["--model", "tiny", "--H", "32", "--W", "32", "--runs", "1", "--warmup", "0", "--dtype", "fp32"]


def test_methods_json_and_plot(tmp_path):
    bench.main([*QUICK, "--methods", "baseline,sito:0.5,deepcache-n5,dato-coco", "--attention", "sdpa,math",
                "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "speed.png")])
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["dtype"] == "float32" and results["cpu"]
    for attention in ("sdpa", "math"):
        rows = results["methods"][attention]
        assert list(rows) == ["baseline", "sito:0.5", "deepcache-n5", "dato-coco"]
        base = rows["baseline"]
        assert base["speedup"] == 1 and base["calls"] == 51 and base["kinds"] == {"full @ 0": 51}
        assert rows["dato-coco"]["kinds"] == {"full @ 0.4": 5, "depth 1 @ 0.4": 21, "depth 0 @ 0": 25}
        assert rows["deepcache-n5"]["kinds"] == {"full @ 0": 11, "depth 2 @ 0": 40}
        sito = rows["sito:0.5"]
        assert sito["gmacs_run_mm"] < base["gmacs_run_mm"] and sito["gmacs_run"] < base["gmacs_run"]
        assert rows["dato-coco"]["macs_ratio"] > rows["deepcache-n5"]["macs_ratio"] > 2
        assert all(r["run_min_s"] <= r["run_s"] <= r["run_max_s"] for r in rows.values())
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_methods_on_their_own_runs(tmp_path):
    """SPEC@SAMPLER:STEPS times that run's calls; speed-ups and MAC ratios are against the command's baseline."""
    bench.main([*QUICK, "--methods", "baseline,baseline@dpmpp-2m:20,deepcache-n3@dpmpp-2m:20", "--e2e",
                "--steps", "5", "--json", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())["methods"]["sdpa"]
    assert rows["baseline"]["calls"] == 6 and rows["baseline@dpmpp-2m:20"]["kinds"] == {"full @ 0": 20}
    assert rows["deepcache-n3@dpmpp-2m:20"]["kinds"] == {"full @ 0": 7, "depth 2 @ 0": 13}
    assert rows["baseline@dpmpp-2m:20"]["macs_ratio"] == pytest.approx(6 / 20)
    assert rows["deepcache-n3@dpmpp-2m:20"]["macs_ratio"] > rows["baseline@dpmpp-2m:20"]["macs_ratio"]
    assert all(r["e2e_s"] > 0 for r in rows.values())


def test_call_plans_are_timed_by_kind(tmp_path):
    """A plan's one-branch calls are their own kind (timed on half the batch), a skipped call is no kind to time,
    and its MAC ratio counts them as half and nothing."""
    accel = Acceleration(guidance=Guidance(modes=("both", "both", "reuse", "cond", "reuse", "both")), skip=Skip((4,)))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(schedule_entry(accel, "dpmpp-2m", 6)))
    bench.main([*QUICK, "--methods", f"baseline,{plan}", "--sampler", "dpmpp-2m", "--steps", "6", "--e2e",
                "--json", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())["methods"]["sdpa"]
    assert rows[str(plan)]["kinds"] == {"full @ 0": 3, "full @ 0 reuse": 1, "full @ 0 cond": 1, "skipped": 1}
    assert rows[str(plan)]["macs_ratio"] == pytest.approx(6 / 4)


def test_end_to_end_runs_through_generate(tmp_path):
    bench.main([*QUICK, "--methods", "baseline,deepcache-n5", "--steps", "5", "--e2e",
                "--json", str(tmp_path / "e.json")])
    rows = json.loads((tmp_path / "e.json").read_text())["methods"]["sdpa"]
    assert all(r["e2e_s"] > 0 for r in rows.values())


def test_without_a_baseline_there_are_no_ratios(tmp_path, capsys):
    bench.main([*QUICK, "--methods", "sito:0.5", "--steps", "3", "--json", str(tmp_path / "s.json")])
    row = json.loads((tmp_path / "s.json").read_text())["methods"]["sdpa"]["sito:0.5"]
    assert row["speedup"] is None and row["macs_ratio"] is None
    assert "sito:0.5" in capsys.readouterr().out


def test_the_size_defaults_to_the_models_training_size(tmp_path):
    """Without --H/--W a model is timed at its own size (the tiny model's 64 px: 8x8 latents), not SD's 512."""
    bench.main([*QUICK[:2], *QUICK[6:], "--methods", "baseline", "--steps", "2", "--json", str(tmp_path / "t.json")])
    args = json.loads((tmp_path / "t.json").read_text())["args"]
    assert (args["H"], args["W"]) == (64, 64)


def test_selection(tmp_path):
    bench.main([*QUICK, "--selection", "--H", "64", "--W", "64", "--json", str(tmp_path / "sel.json")])
    rows = json.loads((tmp_path / "sel.json").read_text())["selection"]
    assert set(rows) == {"0.3", "0.5", "0.7"} and len(rows["0.5"]) == 5


def test_plot_without_baseline_times_it_too(tmp_path, capsys):
    """The plot shows speed-ups against the baseline: --plot adds it to --methods, and the results are kept."""
    bench.main([*QUICK, "--methods", "sito:0.5", "--steps", "2", "--plot", str(tmp_path / "p.png"),
                "--json", str(tmp_path / "p.json")])
    rows = json.loads((tmp_path / "p.json").read_text())["methods"]["sdpa"]
    assert list(rows) == ["baseline", "sito:0.5"] and rows["sito:0.5"]["speedup"] > 0
    assert (tmp_path / "p.png").stat().st_size > 0 and "timing baseline too" in capsys.readouterr().out


def test_results_are_written_before_the_plot(tmp_path, monkeypatch):
    """A plot that fails after the timing loses nothing: the JSON and the table are already written."""
    monkeypatch.setattr(bench, "draw_speedups", lambda *a: (_ for _ in ()).throw(ValueError("plot failed")))
    with pytest.raises(SystemExit):
        bench.main([*QUICK, "--methods", "baseline", "--steps", "2", "--plot", str(tmp_path / "p.png"),
                    "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    assert "baseline" in json.loads((tmp_path / "r.json").read_text())["methods"]["sdpa"]
    assert "| baseline |" in (tmp_path / "r.md").read_text()


def test_lab_model_end_to_end_uses_the_lab_tokenizer(tmp_path):
    """--model lab --e2e encodes its prompt: with the lab tokenizer, whose ids fit its 564-id vocabulary."""
    bench.main([*QUICK, "--model", "lab", "--methods", "baseline", "--steps", "1", "--e2e",
                "--json", str(tmp_path / "l.json")])
    assert json.loads((tmp_path / "l.json").read_text())["methods"]["sdpa"]["baseline"]["e2e_s"] > 0


def test_checkpoint_size_checked_before_loading(capsys, monkeypatch):
    """The factor of a checkpoint is read from its metadata (the lab model's 4), else SD's 8, before loading."""
    assert {config.vae.factor for config in ARCHITECTURES} == {8}   # what bench assumes of files without metadata
    monkeypatch.setattr(bench, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before checking --H"))
    with pytest.raises(SystemExit):
        bench.main([*QUICK, "--ckpt", str(ROOT / "lab" / "lab-sd.safetensors"), "--H", "130"])
    err = capsys.readouterr().err
    assert "--H 130" in err and "multiples of 4" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content,match", [(b"not weights at all", "not a valid .safetensors file"),
                                           (None, "unsupported file type '.md'")])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, content, match):
    path = tmp_path / ("bad.safetensors" if content else "notes.md")
    path.write_bytes(content or b"# notes")
    with pytest.raises(SystemExit):
        bench.main([*QUICK, "--ckpt", str(path), "--methods", "baseline"])
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "compare", lambda *a: pytest.fail("timed before checking the outputs"))
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SystemExit):
        bench.main([*QUICK, "--markdown", str(tmp_path / "ro" / "t.md")])
    assert "--markdown" in capsys.readouterr().err


def test_schedule_file_with_a_fractional_depth(tmp_path, capsys, monkeypatch):
    """A depth of 1.5 is refused when the file is read (cache/schedule.py), not as a TypeError inside the timing."""
    monkeypatch.setattr(bench, "random_unet", lambda *a, **k: pytest.fail("loaded weights before checking"))
    entry = json.loads((ROOT / "lab" / "schedules" / "plms50.json").read_text())["points"][0]
    entry["depths"][3] = 1.5
    (tmp_path / "f.json").write_text(json.dumps(entry))
    with pytest.raises(SystemExit):
        bench.main([*QUICK, "--methods", f"baseline,{tmp_path / 'f.json'}"])
    err = capsys.readouterr().err
    assert "is not a valid schedule" in err and "whole number" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,match", [
    (["--methods", "foo"], "unknown method 'foo': use 'baseline', 'tome:R'"),
    (["--methods", ""], "comma-separated list"), (["--methods", "baseline,baseline"], "distinct"),
    (["--methods", "sito:0.5,sito:0.50"], "'sito:0.5' and 'sito:0.50' are the same run; give it once"),
    (["--methods", "baseline,baseline@plms:50"], "'baseline' and 'baseline@plms:50' are the same run"),
    (["--attention", "sdpa,sdpa"], "--attention sdpa,sdpa: give distinct backends"),
    (["--selection", "--methods", "sito:0.5"], "--selection times token selection alone, no method: leave out "
                                               "--methods"),
    (["--methods", "deepcache-n9"], "a preset (deepcache-n3"), (["--methods", "sito:abc"], "is not a number"),
    (["--methods", "tome:0.9"], "prune ratio 0.9 out of range"),
    (["--methods", "baseline,dato-coco", "--steps", "20"], "is for PLMS-50 (51 UNet calls); this run is PLMS-20"),
    (["--methods", "nothere.json"], "schedule file 'nothere.json' does not exist"),
    (["--methods", "baseline@plms:0"], "from 1 to 999, got 0"),
    (["--runs", "0"], "--runs must be >= 1"), (["--runs", "-3"], "--runs must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"), (["--batch", "0"], "--batch must be >= 1"),
    (["--threads", "0"], "--threads must be from 1 to"), (["--threads", "-2"], "--threads must be from 1 to"),
    (["--steps", "0", "--methods", "baseline"], "--steps must be a whole number from 1 to 999, got 0"),
    (["--H", "60"], "multiples of 8"), (["--H", "130"], "--H 130: --H and --W must be positive multiples of 8"),
    (["--W", "0"], "--W 0: --H and --W must be positive multiples of 8"),
    (["--ckpt", "nothere.safetensors"], "--ckpt 'nothere.safetensors' does not exist"),
    (["--json", "/no/such/folder/r.json"], "--json '/no/such/folder/r.json' is in '/no/such/folder', which does not"),
    (["--markdown", "."], "--markdown '.' is a folder"),
    (["--json", "README.md"], "'README.md' exists (results are not"),
    (["--plot", "speed.xyz"], "--plot 'speed.xyz': give a picture file name matplotlib writes"),
    (["--plot", "speed"], "--plot 'speed': give a picture file name"), (["--json", ""], "--json is empty; name a file"),
    (["--json", "same.out", "--markdown", "same.out"], "--markdown 'same.out' is also the --json file"),
    (["--selection", "--H", "72"], "--H 72: --H and --W must be positive multiples of 16"),
    (["--selection", "--plot", "s.png"], "--plot shows the methods' results"),
    (["--selection", "--H", "65536", "--W", "65536"], "GiB are free: lower --H/--W or --batch"),
    (["--selection", "--batch", "100000", "--H", "2048", "--W", "2048"], "--batch 100000 needs about"),
    (["--macs-only", "--vs-diffusers"], "--macs-only counts an architecture's MACs"),
    (["--attention", "flash"], "--attention flash"), (["--device", "cuda:7"], "--device cuda:7")])
def test_bad_input_before_timing(capsys, monkeypatch, args, match):
    for name in ("random_weights", "random_unet", "load_checkpoint"):
        monkeypatch.setattr(bench, name, lambda *a, **k: pytest.fail("loaded weights before checking"))
    monkeypatch.setattr(bench, "compare", lambda *a: pytest.fail("timed before checking"))
    with pytest.raises(SystemExit):
        bench.main([*QUICK, *args])
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_vs_diffusers_without_diffusers_is_refused_up_front(capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else find_spec(name))
    monkeypatch.setattr(bench, "random_unet", lambda *a, **k: pytest.fail("loaded weights before checking"))
    with pytest.raises(SystemExit):
        bench.main([*QUICK, "--vs-diffusers"])
    assert "--vs-diffusers needs diffusers: pip install diffusers" in capsys.readouterr().err


def test_macs_only_counts_sdxl_at_1024_px_without_timing(tmp_path, monkeypatch):
    """SDXL's UNet at 1024 px: 2,989 GMACs a call (about 6 TFLOPs); DeepCache's SDXL setting (a full call every 3,
    the others at depth 2, 4.3% of a full call) saves 2.76x of the MACs of PLMS-50. Nothing is built or timed."""
    for name in ("random_weights", "random_unet", "load_checkpoint", "compare"):
        monkeypatch.setattr(bench, name, lambda *a, **k: pytest.fail("built or timed a model"))
    bench.main(["--model", "sdxl", "--H", "1024", "--W", "1024", "--macs-only", "--methods", "baseline,deepcache-n3",
                "--json", str(tmp_path / "m.json")])
    rows = json.loads((tmp_path / "m.json").read_text())["macs"]
    assert round(rows["baseline"]["gmacs_call"], 1) == 2988.7 and rows["baseline"]["macs_ratio"] == 1
    assert round(rows["deepcache-n3"]["macs_ratio"], 2) == 2.76
