"""bench.py end to end on the TINY architecture: runs in seconds and writes sensible JSON."""
import json
import sys

import pytest

import bench


def run(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", "tiny", "--H", "32", "--W", "32", "--runs", "1",
                                      "--warmup", "0", *args])
    bench.main()


def test_methods_json_and_plot(tmp_path, monkeypatch):
    run(monkeypatch, "--methods", "baseline,sito:0.5,deepcache-n5,dato-coco", "--attention", "sdpa,math",
        "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "speed.png"))
    results = json.loads((tmp_path / "out.json").read_text())
    for attention in ("sdpa", "math"):
        rows = results["methods"][attention]
        assert list(rows) == ["baseline", "sito:0.5", "deepcache-n5", "dato-coco"]
        base = rows["baseline"]
        assert base["speedup"] == 1 and base["calls"] == 51 and base["kinds"] == {"full @ 0": 51}
        assert rows["dato-coco"]["kinds"] == {"full @ 0.4": 5, "depth 1 @ 0.4": 21, "depth 0 @ 0": 25}
        assert rows["deepcache-n5"]["kinds"] == {"full @ 0": 11, "depth 2 @ 0": 40}
        assert rows["sito:0.5"]["gmacs_run_mm"] < base["gmacs_run_mm"] and rows["sito:0.5"]["gmacs_run"] < base["gmacs_run"]
        assert rows["dato-coco"]["macs_ratio"] > rows["deepcache-n5"]["macs_ratio"] > 2
        assert all(r["run_min_s"] <= r["run_s"] <= r["run_max_s"] for r in rows.values())
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_selection(tmp_path, monkeypatch):
    run(monkeypatch, "--selection", "--H", "64", "--W", "64", "--json", str(tmp_path / "sel.json"))
    rows = json.loads((tmp_path / "sel.json").read_text())["selection"]
    assert set(rows) == {"0.3", "0.5", "0.7"} and len(rows["0.5"]) == 5


def test_schedule_that_does_not_fit(monkeypatch):
    with pytest.raises(ValueError, match="51 entries"):
        run(monkeypatch, "--methods", "baseline,dato-coco", "--steps", "20")
