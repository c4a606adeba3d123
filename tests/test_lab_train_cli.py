"""lab.train's command line: a resumed run keeps its recorded settings, bad input is one line before
anything is written, an export never overwrites, and Ctrl-C leaves a run that resumes."""
import json
import os
import re
import shutil
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import save_file
from test_lab_train import SHIPPED, TINY_RUN

import lab.train
from lab.run_config import LAB, STAGE_FILES, write_record
from lab.train import TrainConfig, main, run, train_vae
from model import TINY, load_checkpoint
from model.checkpoint import CONFIG_KEY
from model.config import config_to_json


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run, shared: the tests only read it."""
    out = str(tmp_path_factory.mktemp("tiny") / "run")
    run(TINY_RUN, out, False)
    return out


STARTED = replace(TINY_RUN, batch=4, latents=16, eval_minutes=100)   # a tiny recipe with these three flags
CORES = os.cpu_count() or 1


def record(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


@pytest.fixture
def started(tmp_path):
    """A run `--batch 4 --latents 16 --eval-minutes 100` started: its config.json, which main writes first."""
    out = str(tmp_path / "started")
    write_record(out, STARTED, None)
    return out


@pytest.fixture
def trainings(monkeypatch):
    """What main would train, recorded in place of training: (TrainConfig, init) of each call of run."""
    calls = []
    monkeypatch.setattr(lab.train, "run", lambda cfg, out, resume, init, *_: calls.append((cfg, init)))
    return calls


def refused(capsys, argv):
    """The one error line main gives for `argv` (no usage block, no traceback), without its pointer to --help."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip().removesuffix(" (--help lists the flags)")


@pytest.mark.parametrize("flags, changed", [
    ([], {}),
    (["--batch", "4", "--latents", "16", "--eval-minutes", "100"], {}),   # the command that started it
    (["--unet-minutes", "90"], {"unet_minutes": 90.0}),   # train longer
    (["--eval-minutes", "1"], {"eval_minutes": 1.0}),     # evaluate more often from now on
    (["--compile"], {}),
])
def test_resume_keeps_the_recorded_settings(started, trainings, flags, changed):
    main(["--out", started, "--resume", *flags])
    resumed = replace(STARTED, **changed)
    assert trainings == [(resumed, None)]
    assert record(started) == {**asdict(resumed), "init": None}


@pytest.mark.parametrize("flags, error", [
    (["--resume", "--batch", "64"], "error: --batch 64: .*started was started with --batch 4; drop --batch to resume "
                                    "it, or start a new run in another --out$"),
    (["--resume", "--latents", "24000"], "--latents 24000: .* was started with --latents 16; drop --latents"),
    (["--resume", "--init", SHIPPED], "--init .*: .* was started without --init; drop --init to resume it"),
    (["--resume", "--stage", "decoder"], "--stage decoder: .* was started with --stage all; drop --stage"),
    ([], "holds a run; pass --resume to continue it, or choose another --out"),
])
def test_resume_refuses_a_flag_that_contradicts_the_run(started, trainings, capsys, flags, error):
    before = record(started)
    assert re.search(error, refused(capsys, ["--out", started, *flags]))
    assert trainings == [] and record(started) == before


def test_a_run_started_from_a_model_resumes_from_it(tmp_path, trainings, capsys):
    out = str(tmp_path / "more")
    main(["--out", out, "--init", SHIPPED, "--batch", "4"])
    main(["--out", out, "--resume"])
    main(["--out", out, "--resume", "--init", os.path.relpath(SHIPPED)])   # the same file, named otherwise
    assert trainings == [(replace(TrainConfig(), batch=4), SHIPPED)] * 3
    assert re.search(f"--init .*other.safetensors: {out} was started from {SHIPPED}; drop --init",
                     refused(capsys, ["--out", out, "--resume", "--init", str(tmp_path / "other.safetensors")]))
    old = str(tmp_path / "old")   # a record from before runs recorded --init: the command's is taken
    os.makedirs(old)
    with open(os.path.join(old, "config.json"), "w") as f:
        json.dump(asdict(STARTED), f)
    main(["--out", old, "--resume", "--init", SHIPPED])
    assert trainings[-1] == (STARTED, SHIPPED) and record(old)["init"] == SHIPPED


@pytest.fixture
def bad_files(tmp_path):
    """A file where a folder goes, and --init files that are no whole lab model."""
    (tmp_path / "file").write_text("not a folder")
    with open(SHIPPED, "rb") as f:
        (tmp_path / "truncated.safetensors").write_bytes(f.read()[:100_000])
    (tmp_path / "notes.safetensors").write_text("the weights are on the other disk\n")
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "tiny.safetensors", metadata={CONFIG_KEY: config_to_json(TINY)})
    os.makedirs(tmp_path / "alone")
    shutil.copy(SHIPPED, tmp_path / "alone" / "lab.safetensors")   # without its tokenizer
    os.makedirs(tmp_path / "foreign")
    (tmp_path / "foreign" / "vae.pt").write_text("x\n")   # a folder of other files: a run would write over them
    return tmp_path


@pytest.mark.parametrize("flags, error", [
    (["--batch", "0"], "argument --batch: must be a number above 0, not 0$"),
    (["--latents", "0"], "argument --latents: must be a number above 0, not 0$"),
    (["--threads", "-1"], "argument --threads: must be a number above 0, not -1$"),
    (["--unet-minutes", "0"], "argument --unet-minutes: must be a number above 0, not 0$"),
    (["--decoder-minutes", "-5"], "argument --decoder-minutes: must be a number above 0, not -5$"),
    (["--stage", "unet"], "argument --stage: invalid choice: 'unet' \\(choose from '?all'?, '?decoder'?\\)$"),
    (["--stage", "decoder"], "--stage decoder fine-tunes a trained model's decoder: give it with --init FILE"),
    (["--stage", "decoder", "--init", SHIPPED, "--batch", "4", "--compile"], "--stage decoder trains the decoder "
     "alone: drop --batch, --compile, which set the UNet stage$"),
    (["--init", SHIPPED, "--decoder-minutes", "5"], "--decoder-minutes: a run continued with --init keeps its "
     "model's decoder; fine-tune that in a run of its own \\(--stage decoder\\)$"),
    (["--eval-minutes", "nan"], "argument --eval-minutes: must be a number above 0, not nan$"),
    (["--batch", "2.5"], "argument --batch: invalid int value: '2.5'$"),
    (["--resume"], "--resume: .*new holds no run \\(no config.json\\); drop --resume to start one there$"),
    (["--out", "{tmp}/file"], "--out .*file is a file; choose a folder$"),
    (["--out", "{tmp}/file/run"], "--out .*file/run: cannot write there \\(Not a directory\\); choose a folder"),
    (["--init", "{tmp}/missing.safetensors"], "--init: checkpoint .*missing.safetensors' does not exist; --init "
                                              "takes a lab model written by --export"),
    (["--init", "{tmp}/truncated.safetensors"], "--init: .*truncated.safetensors: not a valid .safetensors file"),
    (["--init", "{tmp}/notes.safetensors"], "--init: .*notes.safetensors: not a valid .safetensors file: it is a "
                                            "text file"),
    (["--init", "{tmp}/plain.safetensors"], "--init: .*plain.safetensors has no 'sd_config' metadata"),
    (["--init", "{tmp}/tiny.safetensors"], "--init: .*tiny.safetensors is not of the lab architecture"),
    (["--init", "{tmp}/alone/lab.safetensors"], "--init: .*lab.safetensors has no tokenizer beside it"),
    (["--out", "{tmp}/foreign"], "--out .*foreign holds other files and no config.json, so it is no lab.train run; "
                                 "choose a new or empty folder \\(nothing is written over\\)$"),
    (["--out", "{tmp}/foreign", "--resume"], "--out .*foreign holds other files and no config.json"),
    # far above the cores, torch's thread pool failed after config.json claimed the folder (a MemoryError)
    (["--threads", str(CORES + 1)], f"error: --threads must be from 1 to this machine's {CORES} CPU cores, "
                                    f"got {CORES + 1}$"),
    (["--out", ""], "argument --out: is empty; give a file or folder name$"),
    (["--init", ""], "argument --init: is empty; give a file or folder name$"),
])
def test_bad_input_is_one_line_before_anything_is_written(bad_files, trainings, capsys, flags, error):
    argv = ["--out", str(bad_files / "new"), *(f.format(tmp=bad_files) for f in flags)]
    assert re.search(error, refused(capsys, argv))
    assert trainings == [] and not os.path.exists(bad_files / "new")
    assert (bad_files / "file").read_text() == "not a folder"
    assert os.listdir(bad_files / "foreign") == ["vae.pt"] and (bad_files / "foreign" / "vae.pt").read_text() == "x\n"


@pytest.mark.parametrize("edit, error", [
    ({"vae_steps": "5"}, "'vae_steps' is \"5\", not an integer"),   # used to fail deep in the VAE stage
    ({"lr": "fast"}, "'lr' is \"fast\", not a number"),
    ({"unet_steps": 2.5}, "'unet_steps' is 2.5, not an integer or null"),
    ({"batch": True}, "'batch' is true, not an integer"),
    ({"init": 3}, "'init' is 3, not a path or null"),
    ({"stage": "unet"}, "'stage' is \"unet\", not one of all, decoder"),
])
def test_a_record_of_the_wrong_types_is_one_line(started, trainings, capsys, edit, error):
    path, edited = os.path.join(started, "config.json"), {**record(started), **edit}
    with open(path, "w") as f:
        json.dump(edited, f)
    before = record(started)
    line = refused(capsys, ["--out", started, "--resume"])
    assert line == f"python -m lab.train: error: {path}: {error}; correct it in config.json (or choose another --out)"
    assert trainings == [] and record(started) == before


def test_a_refused_init_leaves_nothing_that_refuses_the_corrected_command(bad_files, trainings, capsys):
    out = str(bad_files / "more")
    refused(capsys, ["--out", out, "--init", str(bad_files / "truncated.safetensors")])
    main(["--out", out, "--init", SHIPPED])
    assert trainings == [(TrainConfig(), SHIPPED)]


@pytest.mark.parametrize("flags, error", [
    (["--out", "{tmp}/none", "--export", "{tmp}/lab.safetensors"], "--export: .*none holds no run trained up to "
     "its UNet stage \\(no tokenizer, vae.pt, latents.pt, unet.pt\\); name the run's folder with --out$"),
    (["--out", "{tmp}/decoder-run", "--export", "{tmp}/lab.safetensors"], "--export: .*decoder-run holds no run "
     "trained up to its decoder stage \\(no decoder.pt\\); name the run's folder with --out$"),
    (["--out", "{tmp}", "--export", SHIPPED], f"--export {SHIPPED} exists, and an export never overwrites one; "
     "export beside it \\(--export .*lab-sd-new.safetensors\\), check it, then move it over: mv .*lab-sd-new"),
    (["--export", "{tmp}/lab.pt"], "--export .*lab.pt: the name must end in .safetensors"),
    (["--export", ""], "argument --export: is empty; give a file or folder name$"),
    (["--export", "{tmp}/lab.safetensors", "--batch", "4", "--resume"], "--export writes a trained run's model and "
     "stops: drop --batch, --resume"),
])
def test_export_refuses_bad_input_in_one_line_before_loading(tmp_path, capsys, flags, error):
    os.makedirs(tmp_path / "decoder-run" / "tokenizer")   # a --stage decoder run stopped before its first checkpoint
    (tmp_path / "decoder-run" / "vae.pt").touch()
    write_record(str(tmp_path / "decoder-run"), replace(TINY_RUN, stage="decoder"), SHIPPED)
    shipped = os.stat(SHIPPED)
    assert re.search(error, refused(capsys, [f.format(tmp=tmp_path) for f in flags]))
    assert os.stat(SHIPPED).st_mtime_ns == shipped.st_mtime_ns and not os.path.exists(tmp_path / "lab.safetensors")


def test_an_interrupted_export_leaves_no_file_and_a_done_one_is_never_overwritten(tiny_run, tmp_path, monkeypatch,
                                                                                 capsys):
    path = str(tmp_path / "lab.safetensors")

    def torn(state, tmp, **kwargs):   # Ctrl-C halfway through writing
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(lab.train, "save_file", torn)
        with pytest.raises(SystemExit, match=f"^interrupted; {path} was not written: rerun the same command$"):
            main(["--out", tiny_run, "--export", path])
    assert not os.path.exists(path)
    main(["--out", tiny_run, "--export", path])
    assert load_checkpoint(path).config.unet == LAB.unet
    written = os.stat(path)
    assert "exists, and an export never overwrites one" in refused(capsys, ["--out", tiny_run, "--export", path])
    assert os.stat(path).st_mtime_ns == written.st_mtime_ns


def unchanged(folder):
    """What a refused command leaves as it was: each file's size and time (config.json may be written again, the
    same: record compares it)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.name != "config.json"}


def damaged(path, how):
    """Replace a stage file by a new one (unlinked first: it is a hard link into the shared tiny run)."""
    data = path.read_bytes()
    path.unlink()
    if how == "foreign":   # a whole torch file, of another program
        torch.save({"x": torch.zeros(1)}, path)
    else:
        path.write_bytes({"empty": b"", "text": b"x\n", "truncated": data[:len(data) // 2]}[how])


WHOLE = "not a whole torch file: truncated, empty or another program's"
RESUME, EXPORT = ["--resume"], ["--export", "{tmp}/m.safetensors"]
AFTER_VAE = " with latents.pt and unet.pt and decoder.pt, made from it,"


@pytest.mark.parametrize("command, name, how, why, also", [
    (RESUME, "vae.pt", "text", WHOLE, AFTER_VAE),   # was an UnpicklingError
    (RESUME, "unet.pt", "truncated", WHOLE, ""),
    (RESUME, "vae.pt", "foreign", "KeyError: 'vae'", AFTER_VAE),
    (RESUME, "latents.pt", "foreign", "KeyError: 'latents'", " with unet.pt, made from it,"),
    (EXPORT, "latents.pt", "empty", WHOLE, " with unet.pt, made from it,"),   # was an EOFError
    (EXPORT, "unet.pt", "foreign", "KeyError: 'config'", ""),
])
def test_an_unreadable_stage_file_is_one_line_naming_it_and_the_fix(tiny_run, tmp_path, capsys, command, name, how,
                                                                     why, also):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, copy_function=os.link)   # hard links: the stage files are not copied
    write_record(str(out), TINY_RUN, None)
    damaged(out / name, how)
    before, recorded = unchanged(out), record(out)
    argv = ["--out", str(out), *(f.format(tmp=tmp_path) for f in command)]
    assert refused(capsys, argv) == (f"python -m lab.train: error: {out / name} cannot be read as lab.train's "
                                     f"checkpoint ({why}); delete it{also} and rerun with --resume (--out {out}) to "
                                     f"make {'them' if also else 'it'} again")
    assert unchanged(out) == before and record(out) == recorded and not (tmp_path / "m.safetensors").exists()


def test_an_export_of_empty_stage_files_is_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    os.makedirs(out / "tokenizer")
    for name in STAGE_FILES:
        (out / name).touch()
    assert f"error: {out / 'vae.pt'} cannot be read as lab.train's checkpoint ({WHOLE}); delete it with latents.pt " \
           "and unet.pt" in refused(capsys, ["--out", str(out), "--export", str(tmp_path / "m.safetensors")])
    assert sorted(os.listdir(out)) == ["decoder.pt", "latents.pt", "tokenizer", "unet.pt", "vae.pt"]
    assert not (tmp_path / "m.safetensors").exists()


def interrupt_at(monkeypatch, call):
    """Ctrl-C at the `call`-th batch of pictures made tensors: a VAE step, or a chunk of latents after them."""
    calls, to_tensor = [], lab.train.to_tensor

    def interrupted(images):
        calls.append(len(images))
        if len(calls) == call:
            raise KeyboardInterrupt
        return to_tensor(images)

    monkeypatch.setattr(lab.train, "to_tensor", interrupted)


def test_ctrl_c_in_any_stage_is_one_line_and_resume_finishes_the_same_run(started, tmp_path, monkeypatch):
    command = ["--out", started, "--resume"]
    for call in (STARTED.vae_steps, STARTED.vae_steps + 1):   # the last VAE step; the first chunk of latents
        with monkeypatch.context() as patched:
            interrupt_at(patched, call)
            with pytest.raises(SystemExit, match="^interrupted; rerun the same command with --resume to continue "
                                                 f"from the last checkpoint in {started}$"):
                main(command)
    assert torch.load(os.path.join(started, "vae.pt"))["step"] == STARTED.vae_steps   # whole, as the VAE ended
    assert not os.path.exists(os.path.join(started, "latents.pt"))
    main(command)
    straight = train_vae(STARTED, str(tmp_path), False).state_dict()   # the same VAE, never interrupted
    for k, v in torch.load(os.path.join(started, "vae.pt"))["vae"].items():
        assert torch.equal(v, straight[k]), k
    unet = torch.load(os.path.join(started, "unet.pt"))
    assert unet["step"] == STARTED.unet_steps and unet["config"] == asdict(STARTED)
    assert len(torch.load(os.path.join(started, "latents.pt"))["captions"]) == STARTED.latents
    assert record(started) == {**asdict(STARTED), "init": None}
