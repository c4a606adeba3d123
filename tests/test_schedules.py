"""Schedule files (what search.py writes, FILE.json or FILE.json#k) work wherever a preset does: they
round-trip every preset call by call, render the preset's images in sample.py, plug into evaluate.py's
and bench.py's --methods, and are refused, with a clear message, for a run they were not made for."""
import json
import os

import pytest
from PIL import Image

import sample
from accel import PRESETS, Acceleration, find_preset
from cache import FULL, CacheSchedule
from model import load_checkpoint
from prune import token_method
from sampler import call_sigmas, unet_calls
from sampler.generate import from_pil
from tools import evaluate
from tools.measure import run_macs, run_plans
from tools.specs import parse_methods, schedule_entry

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "lab-sd.safetensors")


def write(path, *entries):
    with open(path, "w") as f:
        json.dump(entries[0] if len(entries) == 1 else {"points": list(entries)}, f)
    return str(path)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_call_by_call(tmp_path, name):
    preset = PRESETS[name]
    sampler, steps = preset.made_for or ("ddim", 20)
    path = write(tmp_path / "s.json", schedule_entry(preset.acceleration(), sampler, steps, about=preset.about))
    loaded = find_preset(path)
    calls = len(loaded.acceleration().depths(51 if sampler == "plms" else steps))
    assert loaded.made_for == (sampler, steps) and loaded.about == preset.about
    assert run_plans(loaded.acceleration(), calls) == run_plans(preset.acceleration(), calls)
    if preset.prune is not None:   # every other pruning setting carried over
        keep = {k: v for k, v in vars(preset.prune).items() if k not in ("ratio", "schedule")}
        assert {k: v for k, v in vars(loaded.prune).items() if k in keep} == keep


def test_sample_with_a_schedule_file_draws_the_presets_image(tmp_path, tokenizer_dir):
    path = write(tmp_path / "coco.json", schedule_entry(PRESETS["dato-coco"].acceleration(), "plms", 50))
    common = ["--prompt", "the cat", "--random-weights", "tiny", "--H", "32", "--W", "32", "--steps", "50",
              "--tokenizer", tokenizer_dir, "--outdir", str(tmp_path / "out")]
    sample.main(common + ["--preset", "dato-coco"])
    sample.main(common + ["--preset", path])
    a, b = (Image.open(tmp_path / "out" / name) for name in ("00000.png", "00001.png"))
    assert from_pil([a]).equal(from_pil([b]))


def steps4(depths, ratios=None):
    prune = token_method("dato", ratio=0.4, schedule=tuple(ratios)) if ratios else None
    return schedule_entry(Acceleration(prune, CacheSchedule("dato", depths=tuple(depths))), "plms", 4)


def test_evaluate_renders_points_of_a_schedule_file_and_refuses_a_changed_one(tmp_path, capsys):
    path = write(tmp_path / "pareto.json", steps4([FULL, 1, 0, FULL, 1]),
                 steps4([FULL, 0, 0, 0, 0], [0, 0.5, 0.5, 0.3, 0.3]))
    results = evaluate.main(["--ckpt", SHIPPED, "--steps", "4", "--n", "2", "--dtype", "fp32", "--out",
                             str(tmp_path / "q"), "--methods", f"baseline,{path}#0,{path}#1"])
    assert 1 < results[f"{path}#0"]["mac_ratio"] < results[f"{path}#1"]["mac_ratio"]
    write(tmp_path / "pareto.json", steps4([FULL, 0, 0, 0, 0], [0, 0.5, 0.5, 0.3, 0.3]), steps4([FULL, 1, 0, FULL, 1]))
    with pytest.raises(SystemExit):   # pareto.json#0 now names another schedule than its folder's images
        evaluate.main(["--ckpt", SHIPPED, "--steps", "4", "--n", "2", "--dtype", "fp32", "--out",
                       str(tmp_path / "q"), "--methods", f"baseline,{path}#0"])
    assert "(acceleration differ)" in capsys.readouterr().err
    kept = sorted(os.listdir(tmp_path / "q" / evaluate.folder_name(f"{path}#1")))
    assert kept == ["00000.png", "00001.png", "settings.json"]   # nothing was overwritten


@pytest.mark.parametrize("spec, message", [
    ("{path}", "holds 2 schedules: pick one"),
    ("{path}#2", "holds schedules #0 .. #1"),
    ("{path}#x", "holds schedules #0 .. #1"),
    ("{missing}", "does not exist"),
])
def test_bad_schedule_specs_are_refused(tmp_path, spec, message):
    path = write(tmp_path / "p.json", steps4([FULL, 1, 0, FULL, 1]), steps4([FULL, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=message):
        parse_methods(spec.format(path=path, missing=tmp_path / "none.json"), "plms", 4)


def test_a_schedule_file_keeps_its_run_and_is_refused_for_another(tmp_path, capsys):
    path = write(tmp_path / "s.json", steps4([FULL, 1, 0, FULL, 1]))
    methods = parse_methods(f"baseline,{path}", "ddim", 5)   # the tools' --methods: each on its own run
    assert (methods["baseline"].sampler, methods["baseline"].steps) == ("ddim", 5)
    assert (methods[path].sampler, methods[path].steps, methods[path].calls) == ("plms", 4, 5)
    with pytest.raises(ValueError, match="is for PLMS-4 .* with sampler plms and 4 steps \\(in --methods: .*@plms:4"):
        parse_methods(f"baseline,{path}@ddim:5", "plms", 4)
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "x", "--random-weights", "tiny", "--steps", "6", "--preset", path])
    assert "is for PLMS-4" in capsys.readouterr().err
    broken = dict(steps4([FULL, 1, 0, FULL, 1]), depths=[FULL, 1])
    with pytest.raises(ValueError, match="2 depths for PLMS-4, which makes 5 UNet calls"):
        find_preset(write(tmp_path / "broken.json", broken))


def test_shipped_lab_schedules_load_and_their_recorded_figures_are_theirs():
    """lab/schedules/*.json (search.py's Pareto sets on the lab model, and the plans made by hand from an
    ablation): every point is a schedule of the run it records; a searched one keeps the constraints its file
    records; the MAC ratio it records is the one its schedule has against that run, and its held-out one
    against PLMS-50 (the held-out images' baseline)."""
    folder = os.path.join(os.path.dirname(SHIPPED), "schedules")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
    assert {"dpmpp-2m-10.json", "plms50.json", "plan-dpmpp-2m-10.json", "plan-dpmpp-2m-20.json"} <= set(files)
    unet = load_checkpoint(SHIPPED).unet
    plms50 = run_macs(unet, None, 51, (32, 32), matmuls=True)
    for name in files:
        path = os.path.join(folder, name)
        with open(path) as f:
            shipped = json.load(f)
        limits = shipped.get("search")
        for k, point in enumerate(shipped["points"]):
            preset = find_preset(f"{path}#{k}")
            calls = unet_calls(point["steps"], point["sampler"])
            base = run_macs(unet, None, calls, (32, 32), matmuls=True)
            accel = preset.acceleration()
            sigmas = call_sigmas(point["sampler"], point["steps"], accel.timesteps or None)
            if limits is not None:
                depths = accel.depths(calls)
                assert preset.made_for == (limits["sampler"], limits["steps"])
                assert depths[0] == FULL and depths.count(FULL) >= limits["min_full"]
                reuses = "".join("0" if d == 0 else "x" for d in depths)
                assert "0" * (limits["max_reuse"] + 1) not in reuses
            stops = point["heldout"].get("guidance_stopped_at", {"-1": 1})   # adaptive guidance: what each image ran
            macs = sum(n * run_macs(unet, accel, calls, (32, 32), matmuls=True, sigmas=sigmas, stopped_at=int(s))
                       for s, n in stops.items()) / sum(stops.values())
            assert base / macs == pytest.approx(point["mac_ratio"]) and base / macs >= (limits or {}).get(
                "min_mac_ratio", 1)
            assert plms50 / macs == pytest.approx(point["heldout"]["mac_ratio"])
