"""search.py: the repair keeps every constraint on random offspring, a tiny search on the tiny model
returns a non-dominated set of schedule files, and a rerun continues the search instead of restarting."""
import json

import numpy as np
import pytest

from accel import find_preset
from cache import FULL
from tools import evaluate, search

pytest.importorskip("pymoo")


PLAIN = (["both"] * 51, [False] * 51)


@pytest.mark.parametrize("plan_genes", [False, True])
def test_repair_keeps_constraints_on_random_offspring(plan_genes):
    space = search.Space(51, "joint", min_full=4, max_reuse=2, guidance=plan_genes, skips=plan_genes, orders=plan_genes)
    problem_repair = search.pymoo_repair(space)
    rng = np.random.default_rng(0)
    offspring = rng.uniform(0, np.array(space.bounds), size=(300, len(space.bounds)))   # as SBX/PM leave them
    for x in problem_repair._do(None, offspring):
        plan = space.decode(x)
        depths, ratios, modes, skipped, order = plan
        made = [i for i in range(51) if not skipped[i]]
        assert order in (0, 1, 2) and (order == 0 or any(depths[i] != FULL for i in made))
        assert depths[0] == FULL and sum(depths[i] == FULL for i in made) >= 4
        zeros = "".join("0" if depths[i] == 0 else "x" for i in made)
        assert "000" not in zeros
        assert all(r == 0 for d, r in zip(depths, ratios, strict=True) if d == 0)
        assert not skipped[0] and not skipped[1]
        assert not any(a and b for a, b in zip(skipped, skipped[1:], strict=False))
        space.acceleration(plan).check(51, [1.0] * 51)   # a plan a run can follow: guidance before reuse, ...
        assert space.repair(plan) == plan   # repaired schedules stay as they are
        assert plan_genes or ((modes, skipped) == PLAIN and order == 0)
    assert space.repair(search.Plan([1] * 51, [0.5] * 51, *PLAIN)).depths.count(FULL) == 4   # only what it must


def test_search_space_round_trips_the_presets():
    space = search.Space(51, "cache")
    depths = find_preset("dato-coco").acceleration().depths(51)
    plan = search.Plan(list(depths), [0.4] * 51, *PLAIN)
    assert space.decode(space.encode(plan)) == plan


def test_initial_population_spans_light_and_heavy_schedules():
    """Random schedules draw their cheapness too: the population is not all at the cheap end."""
    space = search.Space(10, "joint", guidance=True, skips=True)
    rng = np.random.default_rng(0)
    cached = [sum(d != FULL for d in space.repair(space.decode(row)).depths)
              for row in search.initial_population(space, 40, rng)]
    assert min(cached) <= 2 and max(cached) >= 6


TINY = ["--random-weights", "tiny", "--H", "32", "--W", "32", "--steps", "4", "--n", "2", "--batch-size", "2",
        "--population", "4", "--quality", "psnr", "--min-full", "1", "--dtype", "fp32"]


def test_tiny_search_is_non_dominated_and_a_rerun_continues(tmp_path, capsys):
    out = str(tmp_path / "s")
    search.main([*TINY, "--generations", "2", "--scale", "5", "--negative-prompt", "a blue cube", "--out", out])
    printed = capsys.readouterr().out   # the held-out command renders as the search did
    assert "--random-weights tiny --dtype fp32 --steps 4 --sampler plms --scale 5 --H 32 --W 32 " \
           "--negative-prompt 'a blue cube' --n 256" in printed
    first = (tmp_path / "s" / "evaluations.jsonl").read_text().splitlines()
    search.main([*TINY, "--generations", "4", "--scale", "5", "--negative-prompt", "a blue cube", "--out", out])
    lines = (tmp_path / "s" / "evaluations.jsonl").read_text().splitlines()
    assert lines[:len(first)] == first and len(lines) > len(first)          # continued, nothing redone
    keys = [json.loads(line)["key"] for line in lines]
    assert len(set(keys)) == len(keys)
    points = json.load(open(tmp_path / "s" / "pareto.json"))["points"]
    scores = [(p["search_quality"], p["mac_ratio"]) for p in points]
    for a in scores:   # no point is at least as good in both objectives and better in one than another
        assert not any(b != a and b[0] >= a[0] and b[1] >= a[1] for b in scores)
    for k in range(len(points)):   # every point is a schedule file for the run it was searched on
        assert find_preset(f"{tmp_path}/s/pareto.json#{k}").made_for == ("plms", 4)
    heldout = str(tmp_path / "heldout")
    specs = ",".join(f"{out}/pareto.json#{k}" for k in range(len(points)))
    evaluate.main([*TINY[:10], "--dtype", "fp32", "--scale", "5", "--negative-prompt", "a blue cube",
                   "--methods", f"baseline,{specs}", "--out", heldout])
    ship = str(tmp_path / "shipped.json")
    search.main(["--out", f"{tmp_path}/./s", "--report", heldout, "--ship", ship])   # any spelling of the folder
    reported = json.load(open(tmp_path / "s" / "pareto.json"))["points"]
    assert all(p["heldout"]["n"] == 2 and p["heldout"]["mac_ratio"] == pytest.approx(p["mac_ratio"]) for p in reported)
    assert (tmp_path / "s" / "pareto.png").stat().st_size > 0
    shipped = json.load(open(ship))["points"]   # the held-out front: no point beats a shipped one in both
    key = lambda p: json.dumps([p["depths"], p["prune"]])   # noqa: E731
    held = {key(p): (p["heldout"]["by_kind"]["single"]["accuracy"], p["heldout"]["mac_ratio"]) for p in reported}
    beats = lambda b, a: b[0] >= a[0] and b[1] >= a[1] and b != a   # noqa: E731
    ships = {key(p) for p in shipped}
    assert ships and all(not any(beats(b, held[s]) for b in held.values()) for s in ships)
    assert all(any(beats(held[s], a) for s in ships) for k, a in held.items() if k not in ships)
    assert find_preset(f"{ship}#{len(shipped) - 1}").made_for == ("plms", 4)
    with pytest.raises(SystemExit):   # an existing file is not overwritten
        search.main(["--out", out, "--report", heldout, "--ship", ship])
    check_report_refuses_what_is_not_this_search(tmp_path, out, heldout, capsys)


def check_report_refuses_what_is_not_this_search(tmp_path, out, heldout, capsys):
    """--report never rewrites pareto.json from a folder that holds none of its points (another search's
    held-out images), nor from an unreadable file; each is one line naming the file."""
    pareto = (tmp_path / "s" / "pareto.json").read_bytes()
    results = json.load(open(f"{heldout}/results.json"))
    cases = {"other": ({"methods": {"baseline": results["methods"]["baseline"],
                                    "runs/other/pareto.json#0": results["methods"]["baseline"]}}, "holds no point of"),
             "nomethods": ({"points": []}, "has no 'methods'"),
             "garbage": ("{not json", "cannot be read as JSON"),
             "listed": ({"methods": [1]}, "'methods' is not an object of method entries"),
             "nomacs": ({"methods": {**results["methods"], f"{out}/pareto.json#0": {
                 k: v for k, v in results["methods"][f"{out}/pareto.json#0"].items() if k != "mac_ratio"}}},
                 f"'{out}/pareto.json#0' has no mac_ratio")}
    for name, (content, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(content if isinstance(content, str) else json.dumps(content))
        capsys.readouterr()
        with pytest.raises(SystemExit):
            search.main(["--out", out, "--report", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert (tmp_path / "s" / "pareto.json").read_bytes() == pareto
    stored = json.loads(pareto)
    for name, content, message in (("broken", "[1, 2", "broken/pareto.json cannot be read as JSON"),
                                   ("five", {**stored, "points": 5}, "'points' is not a list of schedule entries"),
                                   ("strings", {**stored, "points": ["x"]}, "'points' is not a list of schedule"),
                                   ("nosearch", {"points": stored["points"]}, "has no 'search' record")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pareto.json").write_text(content if isinstance(content, str) else json.dumps(content))
        written = (tmp_path / name / "pareto.json").read_bytes()
        with pytest.raises(SystemExit):
            search.main(["--out", str(tmp_path / name), "--report", heldout])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert (tmp_path / name / "pareto.json").read_bytes() == written
        assert not (tmp_path / name / "pareto.png").exists()
    times = [(tmp_path / "s" / name).stat().st_mtime_ns for name in ("pareto.json", "pareto.png")]
    with pytest.raises(SystemExit):   # a --ship path under a file: refused before pareto.json or .png is rewritten
        search.main(["--out", out, "--report", heldout, "--ship", str(tmp_path / "shipped.json" / "ship.json")])
    err = capsys.readouterr().err
    assert "shipped.json is a file, so nothing can be written under it" in err and len(err.strip().splitlines()) == 1
    assert [(tmp_path / "s" / name).stat().st_mtime_ns for name in ("pareto.json", "pareto.png")] == times


@pytest.mark.parametrize("flags, message", [
    (["--min-mac-ratio", "nan"], "--min-mac-ratio must be a number >= 1"),
    (["--min-mac-ratio", "0.5"], "--min-mac-ratio must be a number >= 1"),
    (["--budget-minutes", "nan"], "--budget-minutes must be a number of minutes > 0"),
    (["--budget-minutes", "-1"], "--budget-minutes must be a number of minutes > 0"),
    (["--depths", "0,1,13"], "--depths 0,1,13: a depth must be in 0..12"),
    (["--depths", "0,x"], "--depths must be comma-separated numbers"),
    (["--ratios", "a,b"], "--ratios must be comma-separated numbers"),
    (["--ratios", "0.3,0.9"], "--ratios 0.3,0.9: a ratio must be in [0, 0.75]"),
    (["--search", "prune"], "--fixed-depths dato-fixed is a schedule of another run"),
    (["--population", "1"], "--population must be >= 2"),
    (["--fixed-ratio", "2"], "--fixed-ratio 2 must be in [0, 0.75]"),
    (["--heldout-seed", "-1"], "--heldout-seed must be >= 0"),
    (["--report", "README.md"], "--report README.md is a file: give the held-out folder"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--out", "README.md"], "--out 'README.md' is a file, not a folder"),
    (["--out", "tests"], "--out 'tests' holds other files and no settings.json"),
    (["--n", "1", "--quality", "fd_lab_vs_baseline"], "--n 1: --quality fd_lab_vs_baseline is a Fréchet distance"),
])
def test_bad_flags_are_one_line_before_anything_is_written(tmp_path, capsys, flags, message):
    out = ["--out", str(tmp_path / "s")] if "--out" not in flags else []
    with pytest.raises(SystemExit):
        search.main([*TINY, *out, *flags])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_min_mac_ratio_renders_only_schedules_that_save_enough(tmp_path, capsys):
    """--min-mac-ratio: schedules below it break pymoo's constraint and are never rendered or reported (the
    baseline and the slow presets of the initial population included); an unreachable floor is refused."""
    out = tmp_path / "s"
    search.main([*TINY, "--generations", "3", "--min-mac-ratio", "2.5", "--out", str(out)])
    records = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert len(records) > 4 and all(r["mac_ratio"] >= 2.5 for r in records)
    points = json.load(open(out / "pareto.json"))["points"]
    assert points and all(p["mac_ratio"] >= 2.5 for p in points)
    with pytest.raises(SystemExit):
        search.main([*TINY, "--generations", "1", "--min-mac-ratio", "50", "--out", str(tmp_path / "t")])
    assert "out of reach" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_a_search_of_guidance_and_skips_writes_plans_a_run_follows(tmp_path):
    """--guidance --skips --orders: the log holds each schedule's modes, skips and forecast order, its MAC ratio
    counts one-branch calls as half and skipped ones as nothing, and every Pareto point loads as a schedule file
    with that plan."""
    out = tmp_path / "s"
    search.main([*TINY, "--generations", "2", "--guidance", "--skips", "--orders", "--out", str(out)])
    records = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert any(r["mac_ratio"] > 1 and set(r["modes"]) - {"both"} for r in records)
    for r in records:   # 5 calls of PLMS-4; depths and ratios are off the analytic count's table here
        plain = all(d == FULL and not ratio for d, ratio in zip(r["depths"], r["ratios"], strict=True))
        if plain:
            shares = [0 if s else 1 if m == "both" else 0.5 for m, s in zip(r["modes"], r["skipped"], strict=True)]
            assert r["mac_ratio"] == pytest.approx(5 / sum(shares))
    points = json.load(open(out / "pareto.json"))["points"]
    for k, point in enumerate(points):
        accel = find_preset(f"{out}/pareto.json#{k}").acceleration()
        modes = point.get("guidance", ["both"] * 5)
        assert [p.guidance for p in accel.plans(5)] == modes
        assert [p.skip for p in accel.plans(5)] == [i in point.get("skip", []) for i in range(5)]
        assert (accel.cache.order if accel.cache else 0) == point.get("order", 0)
    assert all(r["order"] in (0, 1, 2) for r in records)


@pytest.mark.slow
def test_two_workers_search_as_one_process_does(tmp_path):
    """--workers 2 splits each generation's new schedules between two processes: the same evaluations
    (in the same log order) and the same Pareto set as one process."""
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        search.main([*TINY, "--generations", "2", "--threads", "1", "--workers", str(workers), "--out", str(out)])
        records = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
        timings = ("seconds", "share", "unet_seconds")
        runs[workers] = ([{k: v for k, v in r.items() if k not in timings} for r in records],
                         json.load(open(out / "pareto.json"))["points"])
    assert runs[2] == runs[1] and len(runs[1][0]) > 4


def test_cost_time_searches_measured_speed_and_a_rerun_with_other_settings_is_refused(tmp_path, capsys):
    out = str(tmp_path / "s")
    search.main([*TINY, "--generations", "1", "--cost", "time", "--out", out])
    records = [json.loads(line) for line in (tmp_path / "s" / "evaluations.jsonl").read_text().splitlines()]
    assert all(r["speedup"] > 0 and r["unet_seconds"] > 0 for r in records)
    points = json.load(open(tmp_path / "s" / "pareto.json"))["points"]
    scores = [(p["search_quality"], p["speedup"]) for p in points]
    assert all(not any(b != a and b[0] >= a[0] and b[1] >= a[1] for b in scores) for a in scores)
    with pytest.raises(SystemExit):   # the log's evaluations were measured with another objective
        search.main([*TINY, "--generations", "2", "--cost", "macs", "--out", out])
    assert "(cost differ)" in capsys.readouterr().err
    log = (tmp_path / "s" / "evaluations.jsonl").read_text()
    (tmp_path / "s" / "evaluations.jsonl").write_text(log + "{}\n")   # a record without its fields
    with pytest.raises(SystemExit):
        search.main([*TINY, "--generations", "1", "--cost", "time", "--out", out])
    err = capsys.readouterr().err
    assert f"line {len(records) + 1} is not an evaluation record (no key," in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "s" / "evaluations.jsonl").read_text() == log + "{}\n"


def test_a_cut_off_last_evaluation_is_dropped_and_a_damaged_log_named(tmp_path):
    """A run killed while appending leaves half a line: it is dropped and cut from the file, so the next
    append starts a line of its own; a broken line before the end is a damaged log, refused by number."""
    log = tmp_path / "evaluations.jsonl"
    good = [json.dumps({"key": k, "share": 1.0}) for k in ("a", "b")]
    log.write_text("\n".join(good) + '\n{"key": "c", "sh')
    assert [r["key"] for r in search.read_log(str(log), repair=True)] == ["a", "b"]
    assert log.read_text() == "\n".join(good) + "\n"
    log.write_text(good[0] + "\n{broken\n" + good[1] + "\n")
    with pytest.raises(ValueError, match="line 2 is not an evaluation record"):
        search.read_log(str(log), repair=True)
    log.write_text(good[0] + "\n" + json.dumps({"key": "b"}) + "\n")   # whole JSON, but not a whole record
    with pytest.raises(ValueError, match=r"line 2 is not an evaluation record \(no share\)"):
        search.read_log(str(log), repair=True)
