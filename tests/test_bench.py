"""bench.py end to end on the TINY architecture: runs in seconds, writes sensible JSON, and
refuses bad input before any timing."""
import json

import pytest

from tools import bench

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


@pytest.mark.parametrize("args,match", [
    (["--methods", "foo"], "unknown method 'foo': use 'baseline', 'tome:R'"),
    (["--methods", ""], "comma-separated list"), (["--methods", "baseline,baseline"], "distinct"),
    (["--methods", "deepcache-n9"], "a preset (deepcache-n3"), (["--methods", "sito:abc"], "is not a number"),
    (["--methods", "tome:0.9"], "prune ratio 0.9 out of range"),
    (["--methods", "baseline,dato-coco", "--steps", "20"], "is for PLMS-50 (51 UNet calls); this run is PLMS-20"),
    (["--runs", "0"], "--runs must be >= 1"), (["--H", "60"], "multiples of 8"),
    (["--attention", "flash"], "--attention flash"), (["--device", "cuda:7"], "--device cuda:7")])
def test_bad_input_before_timing(capsys, monkeypatch, args, match):
    monkeypatch.setattr(bench, "random_weights", lambda *a, **k: pytest.fail("loaded weights before checking"))
    with pytest.raises(SystemExit):
        bench.main([*QUICK, *args])
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
