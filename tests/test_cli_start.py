"""sample.py from a user's first steps: where the checkpoint comes from (flag, $SD_CKPT, the hub, offline),
damaged weights, the spellings of diffusers and A1111, a schedule file's own run, Ctrl-C while starting up,
and docs that match --help."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image
from safetensors.torch import save_file

import sample
import sampler.cli
from conftest import layout_shapes, random_state
from model import TINY
from sampler.cli import resolve_checkpoint

TINY_RUN = ["--random-weights", "tiny", "--steps", "2", "--H", "32", "--W", "32"]


def params(path):
    return json.loads(Image.open(path).text["parameters"])


def cli(tmp_path, tokenizer_dir, *args):
    return sample.main([*TINY_RUN, "--tokenizer", tokenizer_dir, "--outdir", str(tmp_path), *args])


def test_diffusers_and_a1111_spellings_are_accepted(tmp_path, tokenizer_dir):
    paths = cli(tmp_path, tokenizer_dir, "--prompt", "x", "--num-inference-steps", "3", "--guidance-scale", "5",
                "--height", "32", "--width", "64")
    got = params(paths[0])
    assert (got["steps"], got["scale"], got["H"], got["W"]) == (3, 5.0, 32, 64)
    assert params(cli(tmp_path, tokenizer_dir, "--prompt", "x", "--steps", "2", "--cfg-scale", "3")[0])["scale"] == 3.0


def test_non_finite_weights_are_one_line(tmp_path, tokenizer_dir, capsys):
    state = random_state(layout_shapes(TINY))
    key = next(k for k in state if k.startswith("model.diffusion_model.") and k.endswith("weight"))
    state[key][0] = float("nan")
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "x", "--ckpt", str(tmp_path / "broken.safetensors"), "--tokenizer", tokenizer_dir,
                     "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"hold NaN or inf in 1 tensor(s) ({key.removeprefix('model.diffusion_model.')}" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_checkpoint_from_environment(tmp_path, tokenizer_dir, monkeypatch):
    save_file(random_state(layout_shapes(TINY)), str(tmp_path / "tiny.safetensors"))
    monkeypatch.setenv("SD_CKPT", str(tmp_path / "tiny.safetensors"))
    paths = sample.main(["--prompt", "the cat", "--steps", "2", "--H", "32", "--W", "32", "--sampler", "ddim",
                         "--eta", "0.5", "--tokenizer", tokenizer_dir, "--outdir", str(tmp_path / "out")])
    assert params(paths[0])["checkpoint"].endswith("tiny.safetensors") and params(paths[0])["eta"] == 0.5


def test_missing_sd_ckpt_names_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SD_CKPT", str(tmp_path / "missing.safetensors"))
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "x", "--outdir", str(tmp_path / "out")])
    assert "came from the SD_CKPT environment variable" in capsys.readouterr().err


def test_download_failure_says_what_to_pass(monkeypatch):
    import huggingface_hub
    monkeypatch.delenv("SD_CKPT", raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(sampler.cli, "hub_unavailable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ValueError, match="could not download the SD 1.5 checkpoint \\(OSError: offline\\): pass"):
        resolve_checkpoint(None)


@pytest.mark.parametrize("ckpt, match", [([], "the Hugging Face hub cannot be reached (offline?): pass --ckpt PATH"),
                                         (["--ckpt", ""], "--ckpt is empty")])
def test_no_checkpoint_offline_is_one_line_at_once(tmp_path, monkeypatch, capsys, ckpt, match):
    """Offline with nothing cached, the fix is shown at once, not after the hub client's half minute of retries."""
    import huggingface_hub
    monkeypatch.delenv("SD_CKPT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the hub was asked"))
    start = time.perf_counter()
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "x", "--outdir", str(tmp_path / "out"), *ckpt])
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and time.perf_counter() - start < 5


def test_a_schedule_file_carries_its_run(tmp_path, tokenizer_dir, capsys):
    """--preset FILE#k alone takes the file's sampler and step count (and says so); flags that agree are taken,
    flags that differ are refused as before."""
    path = tmp_path / "schedule.json"
    point = {"sampler": "dpmpp-2m", "steps": 4, "depths": [12, 1, 12, 1], "prune": None}
    path.write_text(json.dumps({"points": [point, {**point, "sampler": "unipc"}]}))
    common = ["--prompt", "x", "--random-weights", "tiny", "--H", "32", "--W", "32", "--tokenizer", tokenizer_dir,
              "--outdir", str(tmp_path / "out")]
    sample.main(common + ["--preset", f"{path}#1"])
    assert (params(tmp_path / "out" / "00000.png")["sampler"], params(tmp_path / "out" / "00000.png")["steps"]) == \
        ("unipc", 4)
    assert "--sampler and --steps from the preset (unipc 4)" in capsys.readouterr().out
    sample.main(common + ["--preset", f"{path}#0", "--steps", "4"])
    assert params(tmp_path / "out" / "00001.png")["sampler"] == "dpmpp-2m"
    assert "--sampler from the preset (dpmpp-2m 4)" in capsys.readouterr().out
    for flags in (["--steps", "5"], ["--sampler", "plms"], ["--plms"]):
        with pytest.raises(SystemExit):
            sample.main(common + ["--preset", f"{path}#0", *flags])
        assert "is for DPMPP-2M-4" in capsys.readouterr().err
    sample.main(common + ["--steps", "2"])   # no preset: PLMS, as before
    assert params(tmp_path / "out" / "00002.png")["sampler"] == "plms"


def test_ctrl_c_while_starting_up_is_one_line():
    """SIGINT while sample.py still imports torch ends in one line, not a traceback through the imports."""
    proc = subprocess.Popen([sys.executable, "sample.py", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    maps, start = f"/proc/{proc.pid}/maps", time.perf_counter()
    while time.perf_counter() - start < 30:   # torch's library is mapped: the handler (set first) is in place,
        with open(maps) as f:                 # and the rest of torch's import still takes about a second
            if "libtorch" in f.read():
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip() == "interrupted while starting up" and out == "", (out, err)


def test_docs_name_every_flag_and_choice_of_the_help():
    """docs/sample.md names every flag sample.py --help shows, and each sampler and random architecture."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    doc = open(os.path.join(root, "docs", "sample.md"), encoding="utf-8").read()
    actions = [a for a in sample.parser()._actions if a.help != argparse.SUPPRESS and a.dest != "help"]
    missing = [o for a in actions for o in a.option_strings if o.startswith("--") and f"`{o}" not in doc
               and f", {o}" not in doc]
    choices = [f"`{c}`" for a in actions if a.dest in ("sampler", "random_weights") for c in a.choices]
    assert missing == [] and [c for c in choices if c not in doc] == []
