"""Bad input to the lab tools' command lines, lab.scenes and lab.check: one line that names the flag
or file and the fix, before any work; nothing written over; no half-written file after Ctrl-C; and
sample.py's repeated images (a rerun into the same folder) counted once."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lab import check as C
from lab import scenes as S
from lab.cli import list_pngs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")   # small tensors: see conftest.one_thread


def files(folder):
    """{name: bytes} of a folder's files."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def error_of(main, argv, capsys):
    """The one error line main(argv) ends with: p.error's (stderr, exit 2) or SystemExit's message."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    return lines[-1] if isinstance(e.value.code, int) else e.value.code


def no_rendering(monkeypatch):
    monkeypatch.setattr(S, "render", lambda *a, **k: pytest.fail("rendered before refusing"))


# ---- lab.scenes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--n", "-1"), ("--n", "0"), ("--seed", "-1"), ("--pairs", "2"), ("--pairs", "-0.1"), ("--pairs", "nan"),
    ("--noise", "100000"), ("--noise", "-1"), ("--noise", str(S.MAX_NOISE + 1))])
def test_scenes_refuses_bad_numbers(tmp_path, capsys, monkeypatch, flag, value):
    no_rendering(monkeypatch)
    argv = {"--n": "3", "--seed": "0", "--out": str(tmp_path / "out"), flag: value}
    line = error_of(S.main, [x for kv in argv.items() for x in kv], capsys)
    assert f"error: {flag} " in line and re.findall(r"--\w+", line) == [flag, "--help"]     # that flag, no other
    assert not (tmp_path / "out").exists()


def test_max_noise_never_clips_a_background():
    """+-MAX_NOISE stays inside 0-255 for every background colour the generator draws, so the noise stays
    symmetric (its mean is the flat colour): 100000 used to turn every background black."""
    rng = random.Random(0)
    channels = [c for _ in range(20000) for c in S.background_rgb(rng)]
    assert min(channels) >= S.MAX_NOISE and max(channels) + S.MAX_NOISE <= 255 < max(channels) + S.MAX_NOISE + 1
    config = S.SceneConfig(noise=S.MAX_NOISE)
    for grey in (min(channels), max(channels)):
        scene = S.Scene(S.parse("a red circle"), (grey,) * 3, (), noise_seed=1)
        plane = C.planes(S.draw(scene, config))[0] * 255
        assert abs(plane.mean().item() - grey) < 1 and plane.max() - plane.min() == 2 * S.MAX_NOISE


def test_scenes_never_writes_over(tmp_path, capsys, monkeypatch):
    S.main(["--n", "3", "--seed", "1", "--out", str(tmp_path / "set")])
    before = files(tmp_path / "set")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    no_rendering(monkeypatch)
    for folder in ("set", "other"):    # a data set of its own, or anything else: refused, untouched
        line = error_of(S.main, ["--n", "2", "--seed", "2", "--out", str(tmp_path / folder)], capsys)
        assert f"--out {tmp_path / folder} holds files; choose a new folder" in line
    assert files(tmp_path / "set") == before and files(tmp_path / "other") == {"notes.txt": b"mine"}
    with pytest.raises(S.FolderError):      # the API refuses as well
        S.write_dataset(tmp_path / "set", 2)
    assert files(tmp_path / "set") == before


def test_scenes_writes_into_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert S.write_dataset(tmp_path / "empty", 2, seed=3) == S.sample_captions(2, 3)
    assert sorted(files(tmp_path / "empty")) == ["00000.png", "00001.png", "captions.txt"]


@pytest.mark.parametrize("where, why", [("file", "is a file"), ("file/sub", "cannot be written (Not a directory)"),
                                        ("/proc/lab-scenes-test", "cannot be written")])
def test_scenes_refuses_an_unusable_out(tmp_path, capsys, monkeypatch, where, why):
    if where.startswith("/proc") and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    (tmp_path / "file").write_text("keep")
    out = where if where.startswith("/") else str(tmp_path / where)
    no_rendering(monkeypatch)
    assert f"error: --out {out} {why}" in error_of(S.main, ["--n", "2", "--out", out], capsys)
    assert (tmp_path / "file").read_text() == "keep"


def test_scenes_refuses_an_empty_out(tmp_path, capsys, monkeypatch):
    no_rendering(monkeypatch)
    monkeypatch.chdir(tmp_path)   # where an empty path would land
    assert error_of(S.main, ["--n", "2", "--out", ""], capsys) == \
        "python -m lab.scenes: error: argument --out: is empty; give a file or folder name (--help lists the flags)"
    assert os.listdir(tmp_path) == []


class Interrupted:
    """An image whose saving is cut short by Ctrl-C after the PNG signature."""

    def save(self, f, format):
        f.write(b"\x89PNG\r\n\x1a\n")
        raise KeyboardInterrupt


def test_scenes_ctrl_c_leaves_whole_pngs_only(tmp_path, monkeypatch):
    real, calls = S.render, []
    monkeypatch.setattr(S, "render", lambda *a: calls.append(a) or (real(*a) if len(calls) < 3 else Interrupted()))
    with pytest.raises(SystemExit) as e:
        S.main(["--n", "5", "--out", str(tmp_path / "out")])
    assert e.value.code == (f"interrupted; {tmp_path / 'out'} holds 2 of 5 whole PNGs and no captions.txt: "
                            "delete it and run again")
    assert sorted(files(tmp_path / "out")) == ["00000.png", "00001.png"]
    for name in ("00000.png", "00001.png"):
        Image.open(tmp_path / "out" / name).load()


def test_scenes_ctrl_c_for_real(tmp_path):
    """A real SIGINT while writing: one line, no traceback, and every PNG left whole."""
    out = tmp_path / "out"
    # A shell starts background jobs with SIGINT ignored, and children inherit that; Python then installs no
    # KeyboardInterrupt handler. Restore the default, so the test means the same wherever pytest was started.
    proc = subprocess.Popen([sys.executable, "-m", "lab.scenes", "--n", "100000", "--out", str(out)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(out.glob("*.png")) if out.is_dir() else []) < 3:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and err.startswith("interrupted; ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (out / "captions.txt").exists()
    for png in out.iterdir():
        assert png.suffix == ".png"
        Image.open(png).load()


# ---- lab.check ------------------------------------------------------------------------------------

def scene_set(folder, n=3, seed=1):
    S.write_dataset(folder, n, seed)
    return folder


def sampled(folder, runs):
    """A folder as sample.py writes it: PNGs numbered on across runs, each run ([(prompt, seed)], steps),
    the settings in each PNG's `parameters` chunk; the image is the prompt's scene (a red circle for a
    prompt outside the grammar)."""
    folder.mkdir(exist_ok=True)
    k = len(list(folder.glob("*.png")))
    for images, steps in runs:
        for caption, seed in images:
            info = PngInfo()
            info.add_text("parameters", json.dumps({"prompt": caption, "seed": seed, "steps": steps}))
            S.render(caption if drawable(caption) else "a red circle", seed).save(folder / f"{k:05d}.png", pnginfo=info)
            k += 1
    return folder


def drawable(caption):
    try:
        return S.parse(caption)
    except ValueError:
        return None


def truncated(folder):
    png = scene_set(folder) / "00001.png"
    png.write_bytes(png.read_bytes()[:300])
    return png


def bad_captions(folder, text):
    scene_set(folder)
    (folder / "captions.txt").write_bytes(text)
    return folder / "captions.txt"


BAD_FOLDERS = {   # name: (make it in tmp_path / "d", what the error line says)
    "missing": (lambda d: None, "{d} is missing: give a folder of PNGs"),
    "a file": (lambda d: d.write_text("x"), "{d} is a file: give a folder of PNGs"),
    "empty": (lambda d: d.mkdir(), "{d} holds no PNG images: nothing to score"),
    "no captions": (lambda d: (scene_set(d) / "captions.txt").unlink(),
                    "{d}/00000.png: no captions.txt, and no prompt in the PNG's `parameters`"),
    "too few lines": (lambda d: bad_captions(d, b"a red circle\na blue square\n"),
                      "{d}/captions.txt has 2 lines for 3 PNGs; it needs one caption per PNG"),
    "too many lines": (lambda d: bad_captions(d, b"a red circle\n" * 4), "{d}/captions.txt has 4 lines for 3 PNGs"),
    "not the grammar": (lambda d: bad_captions(d, b"a red circle\na purple circle\na red circle\n"),
                        "{d}/captions.txt line 2: not a scene caption: 'a purple circle'"),
    "not UTF-8": (lambda d: bad_captions(d, "a red circle\na r\xe9d circle\na red circle\n".encode("latin-1")),
                  "{d}/captions.txt is not UTF-8 (byte 16); save it as UTF-8 text"),
    "truncated PNG": (truncated, "{d}/00001.png is not a readable image (image file is truncated); delete or"),
    # '²'.isdigit() is True, but int('²') fails: only ASCII digits number a PNG, others sort by name after them
    "superscript digit": (lambda d: (scene_set(d) / "².png").touch(), "{d}/².png is not a readable image"),
    "prompt not the grammar": (lambda d: sampled(d, [([("a red circle", 0), ("a cat", 1)], 20)]),
                               "{d}/00001.png: its prompt: not a scene caption: 'a cat'"),
    "same prompt and seed, other settings": (
        lambda d: sampled(d, [([("a red circle", 0)], 20), ([("a red circle", 0)], 50)]),
        "{d}/00000.png and {d}/00001.png have the same prompt and seed but other steps: the folder mixes runs"),
}


def test_only_ascii_digits_number_a_png(tmp_path):
    """As lab.scenes and sample.py name them; '²' and '٣' are digits to str.isdigit (int() takes only the second)."""
    for name in ("10.png", "2.png", "².png", "٣.png", "b.png"):
        (tmp_path / name).touch()
    assert [os.path.basename(p) for p in list_pngs(tmp_path)] == ["2.png", "10.png", "b.png", "².png", "٣.png"]


@pytest.mark.parametrize("name", list(BAD_FOLDERS))
def test_check_refuses_a_bad_folder_in_one_line(tmp_path, capsys, name):
    make, message = BAD_FOLDERS[name]
    make(tmp_path / "d")
    report = tmp_path / "report.json"
    line = error_of(C.main, [str(tmp_path / "d"), "--json", str(report)], capsys)
    assert line.startswith("error: " + message.format(d=tmp_path / "d")), line
    assert "\n" not in line and not report.exists()


@pytest.mark.parametrize("where, why", [("report.json", "exists; choose another file or delete it"),
                                        ("no/such/folder/r.json", "cannot be written (No such file or directory)"),
                                        ("/proc/lab-check.json", "cannot be written")])
def test_check_refuses_an_unwritable_json_before_scoring(tmp_path, capsys, monkeypatch, where, why):
    if where.startswith("/proc") and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    (tmp_path / "report.json").write_text("an earlier report")
    path = where if where.startswith("/") else str(tmp_path / where)
    monkeypatch.setattr(C, "check_folder", lambda *a: pytest.fail("scored before refusing --json"))
    assert error_of(C.main, [str(scene_set(tmp_path / "set")), "--json", path], capsys).startswith(
        f"error: --json {path} {why}")
    assert (tmp_path / "report.json").read_text() == "an earlier report"


@pytest.mark.parametrize("argv, flag", [(["{d}/set", "--json", ""], "--json"), ([""], "folder"),
                                        (["", "--json", "{d}/r.json"], "folder")])
def test_check_refuses_an_empty_path(tmp_path, capsys, monkeypatch, argv, flag):
    """--json '' (an unset shell variable, say) used to score the folder and write no report, silently."""
    monkeypatch.setattr(C, "check_folder", lambda *a: pytest.fail("scored before refusing an empty path"))
    line = error_of(C.main, [a.format(d=tmp_path) for a in argv], capsys)
    assert line == f"python -m lab.check: error: argument {flag}: is empty; give a file or folder name " \
                   "(--help lists the flags)", line
    assert os.listdir(tmp_path) == []


def test_check_counts_a_rerun_once(tmp_path, capsys):
    """sample.py after Ctrl-C and a rerun: the first run wrote 2 of 3 images, the rerun all 3 again
    under new numbers. Each (prompt, seed) counts once, and the output says so."""
    run = [("a red circle", 10), ("a blue square above a green circle", 11), ("a yellow triangle", 12)]
    folder = sampled(tmp_path / "out", [(run[:2], 20), (run, 20)])
    report = C.main([str(folder), "--json", str(tmp_path / "r.json")])
    assert report["n"] == 3 and report["accuracy"] == 1 and [r["file"] for r in report["images"]] == [
        "00000.png", "00001.png", "00004.png"]
    assert report["duplicates"] == [{"file": "00002.png", "same_as": "00000.png"},
                                    {"file": "00003.png", "same_as": "00001.png"}]
    out = capsys.readouterr().out
    assert "2 repeated images not counted (same prompt, seed and settings), e.g. 00002.png repeats 00000.png" in out
    assert "accuracy 100.0% of 3" in out
    assert json.loads((tmp_path / "r.json").read_text())["duplicates"] == report["duplicates"]
    # other seeds of the same prompts are other images: all counted; so are images without a seed
    assert C.main([str(sampled(tmp_path / "seeds", [(run, 20), ([(c, s + 3) for c, s in run], 20)]))])["n"] == 6
    (tmp_path / "unseeded").mkdir()
    for k in range(2):
        info = PngInfo()
        info.add_text("parameters", json.dumps({"prompt": "a red circle"}))
        S.render("a red circle", k).save(tmp_path / "unseeded" / f"{k}.png", pnginfo=info)
    assert C.main([str(tmp_path / "unseeded")])["n"] == 2


def test_check_ctrl_c_writes_nothing(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "check", interrupted)
    with pytest.raises(SystemExit) as e:
        C.main([str(scene_set(tmp_path / "set")), "--json", str(tmp_path / "r.json")])
    assert e.value.code == "interrupted; no report written" and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("argv, start", [
    (["lab.check", "{d}/set"], "error: {d}/set/00001.png is not a readable image"),
    (["lab.scenes", "--n", "2", "--out", "{d}/set"], "python -m lab.scenes: error: --out {d}/set holds files")])
def test_no_traceback_from_the_command_line(tmp_path, argv, start):
    truncated(tmp_path / "set")
    result = subprocess.run([sys.executable, "-m", *(a.format(d=tmp_path) for a in argv)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(start.format(d=tmp_path)) and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr
