"""lab/train.py on a few steps: the tokenizer spells the scene words, training lowers the loss,
a resumed run equals an uninterrupted one, and the export loads through the normal loader. Its command
line: a resumed run keeps its recorded settings, bad input is one line before anything is written, and
Ctrl-C leaves a run that resumes."""
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTokenizer

import lab.train
from lab.pictures import draw_curve
from lab.run_config import write_record
from lab.train import TrainConfig, batch_indices, export, main, min_snr_weights, run, train_vae
from lab.vocab import WORDS, lab_merges, write_lab_tokenizer
from model import LAB, TINY, load_checkpoint
from model.checkpoint import CONFIG_KEY, UNET, read_state_dict
from model.config import config_to_json
from model.text import write_tokenizer
from sampler.generate import Sampling, generate
from sampler.schedule import alphas_cumprod

TINY_RUN = TrainConfig(vae_steps=2, vae_batch=2, latents=8, unet_steps=2, batch=4, eval_captions=2, eval_steps=2,
                       eval_minutes=1e6)
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "lab-sd.safetensors")


def test_tokenizer_spells_every_scene_word_and_falls_back_for_others(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_lab_tokenizer(str(tmp_path)))
    assert len(tokenizer) == LAB.text.vocab_size
    assert tokenizer.bos_token_id == LAB.text.bos_id and tokenizer.eos_token_id == LAB.text.eos_id
    for word in WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tokenizer("purple", add_special_tokens=False).input_ids) > 1   # bytes, no crash


def test_tokenizer_is_the_same_in_every_process():
    """Token ids are what a trained text encoder knows: a new process (another hash seed) must write
    the same vocabulary."""
    code = "from lab.vocab import lab_merges; print(lab_merges())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert outputs == {f"{lab_merges()}\n"}


def test_min_snr_weights():
    alphas = alphas_cumprod().float()
    t = torch.tensor([0, 500, 999])
    w = min_snr_weights(alphas, t, 5.0)
    snr = alphas[t] / (1 - alphas[t])
    assert w[0] == pytest.approx(5.0 / snr[0].item()) and w[2] == 1.0 and torch.all(w <= 1)


def test_batches_are_full_and_cover_every_scene_once_per_epoch():
    n, batch = 10, 4
    stream = torch.cat([batch_indices(0, step, batch, n) for step in range(5)])   # two epochs
    assert all(len(batch_indices(0, step, batch, n)) == batch for step in range(50))
    assert sorted(stream[:n].tolist()) == sorted(stream[n:].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n:])   # each epoch its own order
    # where batches divide the scenes, batch k is slice k of its epoch's permutation, as runs before full
    # batches drew it: such runs resume unchanged
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3 * 7919 + 1))
    assert torch.equal(batch_indices(3, 4, 4, 12), order[4:8])


def fixed_loss(sd, data):
    """The eps loss of the model on the first latents at fixed timesteps and noise."""
    g = torch.Generator().manual_seed(0)
    x0 = data["latents"][:4].float() * sd.config.scale_factor
    t, noise = torch.tensor([100, 300, 500, 700]), torch.randn(x0.shape, generator=g)
    a = alphas_cumprod().float()[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        eps = sd.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, sd.text(data["captions"][:4]))
    return (eps - noise).pow(2).mean().item()


def test_training_lowers_the_loss(tmp_path):
    sd, _ = run(replace(TINY_RUN, unet_steps=0), str(tmp_path), False)
    data = torch.load(tmp_path / "latents.pt")
    before = fixed_loss(sd, data)
    sd, _ = run(replace(TINY_RUN, unet_steps=25, lr=1e-3, warmup=1, batch=4, latents=8), str(tmp_path), True)
    assert fixed_loss(sd, data) < 0.7 * before


def test_the_learning_curve_is_drawn_from_the_log_and_skipped_without_matplotlib(tmp_path, monkeypatch):
    sd, _ = run(replace(TINY_RUN, unet_steps=0), str(tmp_path), False)
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(rows) == 1 and {"step", "minutes", "accuracy", "single", "pair"} <= set(rows[0])
    assert Image.open(tmp_path / "curve.png").size[0] > 300
    (tmp_path / "curve.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # a training-only install
    assert draw_curve(tmp_path / "log.jsonl", tmp_path / "curve.png") is False
    assert not (tmp_path / "curve.png").exists()


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight, _ = run(replace(TINY_RUN, unet_steps=4), str(tmp_path / "a"), False)
    run(replace(TINY_RUN, unet_steps=2), str(tmp_path / "b"), False)
    resumed, _ = run(replace(TINY_RUN, unet_steps=4), str(tmp_path / "b"), True)
    for (k, a), b in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [line.split(",")[0] for line in open(tmp_path / "a" / "log.jsonl")][-1] == \
        [line.split(",")[0] for line in open(tmp_path / "b" / "log.jsonl")][-1]


def test_compiled_training_trains_the_model_itself(tmp_path, monkeypatch):
    """--compile trains sd.unet's own parameters: the same steps as an uncompiled run, and checkpoints
    with the UNet's plain key names (dynamo's eager backend: the wiring, without minutes of inductor)."""
    compiled_modules, eager = [], functools.partial(torch.compile, backend="eager")

    def compile_eager(module):
        compiled_modules.append(module)
        return eager(module)

    monkeypatch.setattr(torch, "compile", compile_eager)
    plain, _ = run(replace(TINY_RUN, unet_steps=2), str(tmp_path / "a"), False)
    compiled, _ = run(replace(TINY_RUN, unet_steps=2), str(tmp_path / "b"), False, compile_unet=True)
    assert compiled_modules == [compiled.unet]
    for (k, a), b in zip(plain.unet.state_dict().items(), compiled.unet.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    assert torch.load(tmp_path / "b" / "unet.pt")["unet"].keys() == plain.unet.state_dict().keys()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run, shared: the tests only read it (an export writes beside its file, not in the run)."""
    out = str(tmp_path_factory.mktemp("tiny") / "run")
    run(TINY_RUN, out, False)
    return out


def train_and_export(tmp_path, tiny_run):
    """The tiny run exported as tmp_path/ship/lab.safetensors (with its tokenizer): a shipped model."""
    os.makedirs(tmp_path / "ship")
    return export(tiny_run, str(tmp_path / "ship" / "lab.safetensors"))


def test_export_loads_and_samples(tmp_path, tiny_run):
    path = train_and_export(tmp_path, tiny_run)
    assert os.path.getsize(path) < 25e6 and os.path.isfile(tmp_path / "ship" / "tokenizer" / "vocab.json")
    sd = load_checkpoint(path)   # no flags: config and tokenizer come with the file
    assert sd.config.image_size == 128 and sd.config.unet == LAB.unet
    image = generate(sd, "a red circle to the left of a blue square", Sampling(steps=2))[0]
    assert image.size == (128, 128)


def test_training_continues_from_shipped_weights(tmp_path, tiny_run):
    path = train_and_export(tmp_path, tiny_run)
    shipped = load_checkpoint(path)
    sd, _ = run(replace(TINY_RUN, unet_steps=0), str(tmp_path / "more"), False, init=path)
    assert sd.config.scale_factor == shipped.config.scale_factor
    ours = {"model.diffusion_model." + k: v for k, v in sd.unet.state_dict().items()}
    ours.update({"first_stage_model." + k: v for k, v in sd.vae.state_dict().items()})   # the encoder included
    stored = read_state_dict(path)
    for k, v in ours.items():
        assert torch.equal(v, stored[k].float()), k
    assert any(k.startswith("first_stage_model.encoder.") for k in ours)


def test_a_continued_run_keeps_its_ema_at_full_decay(tmp_path, tiny_run):
    """The shipped weights are an EMA already: the first step moves the EMA by 1 - ema of the way, not by
    the 90% of a fresh run's warm-up; and a resumed continued run remembers it."""
    path = train_and_export(tmp_path, tiny_run)
    start = {k[len(UNET):]: v.float() for k, v in read_state_dict(path).items() if k.startswith(UNET)}
    sd, ema = run(replace(TINY_RUN, unet_steps=1), str(tmp_path / "a"), False, init=path)
    trained = sd.unet.state_dict()
    for k, v in ema["unet"].state_dict().items():
        assert torch.allclose(v, start[k] + (1 - TINY_RUN.ema) * (trained[k] - start[k]), atol=1e-6), k
    _, straight = run(replace(TINY_RUN, unet_steps=2), str(tmp_path / "b"), False, init=path)
    _, resumed = run(replace(TINY_RUN, unet_steps=2), str(tmp_path / "a"), True)
    for (k, a), b in zip(straight["unet"].state_dict().items(), resumed["unet"].state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_continued_training_keeps_the_shipped_tokenizer(tmp_path, tiny_run):
    """A shipped tokenizer whose ids differ from a new one's (other tie order) is the one training continues with."""
    path = train_and_export(tmp_path, tiny_run)
    write_tokenizer(str(tmp_path / "ship" / "tokenizer"), lab_merges(WORDS[::-1]), compact=True)
    shipped = CLIPTokenizer.from_pretrained(str(tmp_path / "ship" / "tokenizer"))
    caption = "a red circle to the left of a blue square"
    assert shipped(caption).input_ids != CLIPTokenizer.from_pretrained(os.path.join(tiny_run, "tokenizer"))(
        caption).input_ids
    sd, _ = run(replace(TINY_RUN, unet_steps=0), str(tmp_path / "more"), False, init=path)
    ids = shipped(caption).input_ids
    assert sd.text.tokenize([caption])[0, :len(ids)].tolist() == ids


def test_export_refuses_a_different_tokenizer_beside(tmp_path, tiny_run):
    os.makedirs(tmp_path / "ship" / "tokenizer")
    write_tokenizer(str(tmp_path / "ship" / "tokenizer"), lab_merges(WORDS[::-1]), compact=True)
    with pytest.raises(SystemExit, match="different tokenizer"):
        export(tiny_run, str(tmp_path / "ship" / "lab.safetensors"))
    assert not os.path.exists(tmp_path / "ship" / "lab.safetensors")


# ---------------------------------------------------------------------------------------------
# the command line

STARTED = replace(TINY_RUN, batch=4, latents=16, eval_minutes=100)   # a tiny recipe with these three flags


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
    """The one error line main gives for `argv` (after argparse's usage line), with no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


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
    return tmp_path


@pytest.mark.parametrize("flags, error", [
    (["--batch", "0"], "argument --batch: must be a number above 0, not 0$"),
    (["--latents", "0"], "argument --latents: must be a number above 0, not 0$"),
    (["--threads", "-1"], "argument --threads: must be a number above 0, not -1$"),
    (["--unet-minutes", "0"], "argument --unet-minutes: must be a number above 0, not 0$"),
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
])
def test_bad_input_is_one_line_before_anything_is_written(bad_files, trainings, capsys, flags, error):
    argv = ["--out", str(bad_files / "new"), *(f.format(tmp=bad_files) for f in flags)]
    assert re.search(error, refused(capsys, argv))
    assert trainings == [] and not os.path.exists(bad_files / "new")
    assert (bad_files / "file").read_text() == "not a folder"


def test_a_refused_init_leaves_nothing_that_refuses_the_corrected_command(bad_files, trainings, capsys):
    out = str(bad_files / "more")
    refused(capsys, ["--out", out, "--init", str(bad_files / "truncated.safetensors")])
    main(["--out", out, "--init", SHIPPED])
    assert trainings == [(TrainConfig(), SHIPPED)]


@pytest.mark.parametrize("flags, error", [
    (["--out", "{tmp}/none", "--export", "{tmp}/lab.safetensors"], "--export: .*none holds no run trained up to "
     "its UNet stage \\(no tokenizer, vae.pt, latents.pt, unet.pt\\); name the run's folder with --out$"),
    (["--out", "{tmp}", "--export", SHIPPED], f"--export {SHIPPED} exists, and an export never overwrites one; "
     "export beside it \\(--export .*lab-sd-new.safetensors\\), check it, then move it over: mv .*lab-sd-new"),
    (["--export", "{tmp}/lab.pt"], "--export .*lab.pt: the name must end in .safetensors"),
    (["--export", "{tmp}/lab.safetensors", "--batch", "4", "--resume"], "--export writes a trained run's model and "
     "stops: drop --batch, --resume"),
])
def test_export_refuses_bad_input_in_one_line_before_loading(tmp_path, capsys, flags, error):
    shipped = os.stat(SHIPPED)
    assert re.search(error, refused(capsys, [f.format(tmp=tmp_path) for f in flags]))
    assert os.stat(SHIPPED).st_mtime_ns == shipped.st_mtime_ns and not os.path.exists(tmp_path / "lab.safetensors")


def test_an_interrupted_export_leaves_no_file_and_a_done_one_is_never_overwritten(tiny_run, tmp_path, monkeypatch,
                                                                                 capsys):
    path = str(tmp_path / "lab.safetensors")

    def torn(sd, tmp, **kwargs):   # Ctrl-C halfway through writing
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(lab.train, "save_checkpoint", torn)
        with pytest.raises(SystemExit, match=f"^interrupted; {path} was not written: rerun the same command$"):
            main(["--out", tiny_run, "--export", path])
    assert not os.path.exists(path)
    main(["--out", tiny_run, "--export", path])
    assert load_checkpoint(path).config.unet == LAB.unet
    written = os.stat(path)
    assert "exists, and an export never overwrites one" in refused(capsys, ["--out", tiny_run, "--export", path])
    assert os.stat(path).st_mtime_ns == written.st_mtime_ns


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
