"""lab/train.py on a few steps: the tokenizer spells the scene words, training lowers the loss,
a resumed run equals an uninterrupted one, and the export loads through the normal loader (its command
line: test_lab_train_cli.py)."""
import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from lab import recon
from lab.cli import FolderError
from lab.pictures import draw_curve
from lab.run_config import LAB
from lab.train import TrainConfig, batch_indices, export, min_snr_weights, run
from lab.vocab import WORDS, lab_merges, write_lab_tokenizer
from model import TINY, load_checkpoint
from model.checkpoint import CONFIG_KEY, UNET, read_metadata, read_state_dict
from model.config import config_to_json
from model.text import write_tokenizer
from sampler.generate import Sampling, generate
from sampler.schedule import alphas_cumprod

TINY_RUN = TrainConfig(vae_steps=2, vae_batch=2, latents=8, unet_steps=2, batch=4, eval_captions=2, eval_steps=2,
                       eval_minutes=1e6, decoder_steps=1, decoder_batch=2, decoder_eval=2)
PSNR_FLOOR, WORST_PATCH_FLOOR = 35.0, 25.0   # measured on those 8 scenes: 36.33 and 27.35 dB
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "lab-sd.safetensors")


def test_tokenizer_spells_every_scene_word_and_falls_back_for_others(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_lab_tokenizer(str(tmp_path)))
    assert len(tokenizer) == LAB.text.vocab_size
    assert tokenizer.bos_token_id == LAB.text.bos_id and tokenizer.eos_token_id == LAB.text.eos_id
    for word in WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tokenizer("purple", add_special_tokens=False).input_ids) > 1   # bytes, no crash


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight, _ = run(replace(TINY_RUN, unet_steps=4), str(tmp_path / "a"), False)
    run(replace(TINY_RUN, unet_steps=2), str(tmp_path / "b"), False)
    resumed, _ = run(replace(TINY_RUN, unet_steps=4), str(tmp_path / "b"), True)
    for (k, a), b in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [line.split(",")[0] for line in open(tmp_path / "a" / "log.jsonl")][-1] == \
        [line.split(",")[0] for line in open(tmp_path / "b" / "log.jsonl")][-1]


@pytest.mark.slow
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


@pytest.mark.slow
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


def decoder_run(tmp_path, tiny_run, **changes):
    """A --stage decoder run on the tiny run's exported model -> (the model file, the run's folder, its VAE)."""
    path = train_and_export(tmp_path, tiny_run)
    out = str(tmp_path / "decoder")
    vae = run(replace(TINY_RUN, stage="decoder", **changes), out, False, init=path)
    return path, out, vae


def test_the_decoder_stage_changes_only_the_decoder(tmp_path, tiny_run):
    """Encoder, UNet, text encoder and metadata of the exported file are the --init file's, byte for byte;
    post_quant_conv and the decoder are the run's."""
    path, out, vae = decoder_run(tmp_path, tiny_run, decoder_steps=2)
    assert not os.path.exists(os.path.join(out, "unet.pt")) and not os.path.exists(os.path.join(out, "latents.pt"))
    new = export(out, str(tmp_path / "ship" / "lab-new.safetensors"))
    before, after = read_state_dict(path), read_state_dict(new)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    decoder = {k for k in before if k.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv."))}
    assert changed and changed <= decoder
    assert all(after[k].dtype == before[k].dtype for k in before)
    trained = vae.state_dict()
    for k in decoder:
        assert torch.equal(after[k], trained[k.removeprefix("first_stage_model.")].half()), k
    assert read_metadata(new) == read_metadata(path)
    assert load_checkpoint(new).config == load_checkpoint(path).config


def test_a_decoder_export_refuses_a_model_file_gone_or_replaced(tmp_path, tiny_run):
    path, out, _ = decoder_run(tmp_path, tiny_run)
    other = str(tmp_path / "other.safetensors")
    os.rename(path, other)
    with pytest.raises(FolderError, match=f"fine-tuned the decoder of {path}, whose other tensors it exports, but: "
                                          "checkpoint .* does not exist"):
        export(out, str(tmp_path / "a.safetensors"))
    state = read_state_dict(other)
    state["first_stage_model.encoder.conv_in.bias"] += 1   # another model's encoder at the same path
    save_file(state, path, metadata=read_metadata(other))
    with pytest.raises(FolderError, match="has another VAE encoder than the one .* fine-tuned a decoder for"):
        export(out, str(tmp_path / "b.safetensors"))
    assert not os.path.exists(tmp_path / "a.safetensors") and not os.path.exists(tmp_path / "b.safetensors")


@pytest.mark.slow
def test_a_short_decoder_run_lowers_the_reconstruction_error_of_held_out_scenes(tmp_path, tiny_run):
    path, out, _ = decoder_run(tmp_path, tiny_run, decoder_steps=30, decoder_lr=1e-3, decoder_eval=4)
    log = [json.loads(line) for line in open(os.path.join(out, "decoder.jsonl"))]
    images = recon.scenes(4, "held-out")   # neither the training nor the logged scenes
    before = recon.psnr(recon.reconstruct(recon.load_vae(path), images), images)[0].mean()
    after = recon.psnr(recon.reconstruct(recon.load_vae(export(out, str(tmp_path / "ship" / "n.safetensors"))),
                                         images), images)[0].mean()
    assert after > before + 0.25   # measured: 14.13 -> 14.65 dB (a tiny run's encoder has learned little)
    assert [row["step"] for row in log] == [30] and log[0]["psnr"] > 0


@pytest.mark.slow
def test_a_resumed_decoder_run_equals_an_uninterrupted_one(tmp_path, tiny_run):
    _, _, straight = decoder_run(tmp_path / "a", tiny_run, decoder_steps=3)
    path, out, _ = decoder_run(tmp_path / "b", tiny_run, decoder_steps=2)
    resumed = run(replace(TINY_RUN, stage="decoder", decoder_steps=3), out, True, init=path)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_a_run_from_nothing_exports_its_fine_tuned_decoder(tmp_path, tiny_run):
    path = train_and_export(tmp_path, tiny_run)
    decoder = torch.load(os.path.join(tiny_run, "decoder.pt"))["decoder"]
    stored = read_state_dict(path)
    assert decoder and all(torch.equal(stored["first_stage_model." + k], v.half()) for k, v in decoder.items())


def test_the_shipped_vae_reconstructs_fresh_scenes_sharply():
    """A regression guard on the shipped decoder (docs/lab.md gives the 64-scene figures): fresh scenes come back
    above these floors, whole images and their worst 8x8 patch (where a speck or a smeared corner shows)."""
    images = recon.scenes(8, "recon-test")
    whole, worst = recon.psnr(recon.reconstruct(recon.load_vae(SHIPPED), images), images)
    assert whole.mean() > PSNR_FLOOR and worst.median() > WORST_PATCH_FLOOR, (whole, worst)


@pytest.mark.parametrize("flags, error", [
    (["--n", "0"], "--n must be at least 1, got 0$"),
    (["--ckpt", "{tmp}/missing.safetensors"], "--ckpt: checkpoint .*missing.safetensors' does not exist$"),
    (["--sheet", "{tmp}/taken.png"], "--sheet .*taken.png exists; choose another file or delete it"),
    (["--ckpt", ""], "argument --ckpt: is empty; give a file or folder name$"),
    (["--sheet", "{tmp}/r.jpg"], "--sheet .*r.jpg: the name must end in .png"),
    (["--ckpt", "{tmp}/tiny.safetensors"], "--ckpt: .*tiny.safetensors holds no VAE encoder"),
])
def test_lab_recon_refuses_bad_input_in_one_line(tmp_path, capsys, flags, error):
    (tmp_path / "taken.png").write_bytes(b"mine")
    save_file({"first_stage_model.decoder.conv_in.bias": torch.zeros(4)}, tmp_path / "tiny.safetensors",
              metadata={CONFIG_KEY: config_to_json(TINY)})   # a model file whose VAE has no encoder
    with pytest.raises(SystemExit):
        recon.main([f.format(tmp=tmp_path) for f in flags])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(error, err.removesuffix(" (--help lists the flags)")), err
    assert (tmp_path / "taken.png").read_bytes() == b"mine"


def test_lab_recon_measures_and_draws_each_model(tmp_path, capsys):
    recon.main(["--ckpt", SHIPPED, "--ckpt", SHIPPED, "--n", "2", "--sheet", str(tmp_path / "r.png")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and "PSNR" in lines[0]
    assert Image.open(tmp_path / "r.png").size == (2 * 128 * 2, 2 * 128 * 3)   # 2 scenes; scenes and two rows
