"""sample.py end to end on the TINY presets with a synthesized tokenizer."""
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import sample
from conftest import layout_shapes, random_state
from model import TINY

KW = dict(random="tiny", steps=4, H=64, W=48, progress=False)


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_writes_pngs_with_metadata(tmp_path, tokenizer_dir):
    paths = sample.generate(["the cat"], tokenizer=tokenizer_dir, n_samples=2, n_iter=2, seed=7,
                            outdir=str(tmp_path), **KW)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    image = Image.open(paths[3])
    assert image.size == (48, 64) and image.mode == "RGB"
    params = json.loads(image.text["parameters"])
    assert params["prompt"] == "the cat" and params["seed"] == 10 and params["steps"] == 4
    assert params["sampler"] == "plms" and params["checkpoint"] == "random weights: tiny" and params["scale"] == 7.5


def test_same_seed_same_pixels_and_no_overwrite(tmp_path, tokenizer_dir):
    first = sample.generate(["the cat"], tokenizer=tokenizer_dir, seed=3, outdir=str(tmp_path), **KW)
    before = pixels(first[0])
    second = sample.generate(["the cat"], tokenizer=tokenizer_dir, seed=3, outdir=str(tmp_path), **KW)
    assert second[0] != first[0] and second[0].endswith("00001.png")
    assert np.array_equal(pixels(first[0]), before)        # the first file is untouched
    assert np.array_equal(pixels(second[0]), before)       # and the run is reproducible
    other = sample.generate(["the cat"], tokenizer=tokenizer_dir, seed=4, outdir=str(tmp_path), **KW)
    assert not np.array_equal(pixels(other[0]), before)


def test_image_k_uses_seed_plus_k(tmp_path, tokenizer_dir):
    """The second image of a seed-10 batch is the image of seed 11 alone (up to batched-BLAS rounding)."""
    batch = sample.generate(["the cat"], tokenizer=tokenizer_dir, seed=10, n_samples=2, outdir=str(tmp_path / "a"), **KW)
    alone = sample.generate(["the cat"], tokenizer=tokenizer_dir, seed=11, outdir=str(tmp_path / "b"), **KW)
    assert np.abs(pixels(batch[1]) - pixels(alone[0])).max() <= 2


def test_prompt_file_batches(tmp_path, tokenizer_dir):
    (tmp_path / "prompts.txt").write_text("the cat\n\na photo of the cat\nthe\n")
    prompts = sample.read_prompts(from_file=str(tmp_path / "prompts.txt"))
    paths = sample.generate(prompts, tokenizer=tokenizer_dir, n_samples=2, outdir=str(tmp_path / "out"), **KW)
    assert [json.loads(Image.open(p).text["parameters"])["prompt"] for p in paths] == prompts


def test_checkpoint_from_environment(tmp_path, tokenizer_dir, monkeypatch):
    save_file(random_state(layout_shapes(TINY)), str(tmp_path / "tiny.safetensors"))
    monkeypatch.setenv("SD_CKPT", str(tmp_path / "tiny.safetensors"))
    kw = {**KW, "random": None}
    paths = sample.generate(["the cat"], tokenizer=tokenizer_dir, sampler="ddim", outdir=str(tmp_path / "out"), **kw)
    assert json.loads(Image.open(paths[0]).text["parameters"])["checkpoint"].endswith("tiny.safetensors")


def test_download_failure_says_what_to_pass(monkeypatch):
    import huggingface_hub
    monkeypatch.delenv("SD_CKPT", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SystemExit, match="--ckpt PATH"):
        sample.resolve_checkpoint(None)


def test_cli(tmp_path, tokenizer_dir):
    sample.main(["--prompt", "the cat", "--random-weights", "tiny", "--steps", "2", "--H", "32", "--W", "32",
                 "--tokenizer", tokenizer_dir, "--sampler", "ddim", "--eta", "0.5", "--outdir", str(tmp_path)])
    assert json.loads(Image.open(tmp_path / "00000.png").text["parameters"])["eta"] == 0.5


@pytest.mark.parametrize("kw,match", [
    (dict(H=100), "multiple of 8"), (dict(W=0), "multiple of 8"), (dict(steps=0), "steps"),
    (dict(sampler="euler"), "unknown sampler"), (dict(eta=0.3), "PLMS is deterministic"),
    (dict(random="sdxl"), "random-weights preset"), (dict(dtype="int8"), "dtype")])
def test_bad_arguments_fail_before_loading(tmp_path, kw, match):
    """The checkpoint path does not exist: the argument error must come first."""
    with pytest.raises(ValueError, match=match):
        sample.generate(["x"], **{"ckpt": str(tmp_path / "missing.safetensors"), "random": None, **kw})


@pytest.mark.parametrize("args,match", [
    (["--from-file", "nope.txt"], "does not exist"), ([], "give a prompt"), (["--prompt", "x", "--H", "65"], "multiple of 8"),
    (["--prompt", "x", "--from-file", "p.txt"], "not both")])
def test_cli_errors(tmp_path, capsys, args, match):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SystemExit):
        sample.main(args + ["--ckpt", str(tmp_path / "missing.safetensors")])
    assert match in capsys.readouterr().err


def test_prediction_override_with_random_weights(tmp_path, tokenizer_dir):
    paths = sample.generate(["x"], random="tiny", tokenizer=tokenizer_dir, prediction="v", steps=2, H=32, W=32,
                            outdir=str(tmp_path), progress=False)
    assert json.loads(Image.open(paths[0]).text["parameters"])["prediction"] == "v"


def test_unknown_viz_block(tmp_path, tokenizer_dir, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "x", "--random-weights", "tiny", "--steps", "2", "--H", "32", "--W", "32",
                     "--tokenizer", tokenizer_dir, "--prune", "sito", "--viz-prune", str(tmp_path / "viz"),
                     "--viz-block", "input_blocks.1.1.transformer_blocks.O", "--outdir", str(tmp_path / "out")])
    assert "is not a transformer block" in capsys.readouterr().err


def test_missing_tokenizer_is_a_clear_exit(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    with pytest.raises(SystemExit, match="must contain vocab.json and merges.txt"):
        sample.main(["--prompt", "x", "--random-weights", "tiny", "--steps", "2", "--H", "32", "--W", "32",
                     "--tokenizer", str(tmp_path / "tok"), "--outdir", str(tmp_path / "out")])


def test_empty_prompt_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        sample.read_prompts(from_file=str(tmp_path / "empty.txt"))


def test_cli_pruning_and_pictures(tmp_path, tokenizer_dir):
    sample.main(["--prompt", "the cat", "--random-weights", "tiny", "--steps", "3", "--H", "64", "--W", "64",
                 "--tokenizer", tokenizer_dir, "--outdir", str(tmp_path / "out"), "--prune", "sito",
                 "--prune-ratio", "0.6", "--prune-layers", "attn1,attn2", "--viz-prune", str(tmp_path / "viz")])
    accel = json.loads(Image.open(tmp_path / "out" / "00000.png").text["parameters"])["acceleration"]
    assert accel["prune"]["method"] == "sito" and accel["prune"]["layers"] == ["attn1", "attn2"]
    pictures = sorted(p.name for p in (tmp_path / "viz").iterdir())
    assert pictures == [f"seed42_call{i:03d}.png" for i in range(4)]   # PLMS-3: 4 UNet calls
    roles = np.asarray(Image.open(tmp_path / "viz" / pictures[0]))[::4, ::4]
    assert roles.shape[:2] == (8, 8)
    colors = {tuple(c) for c in roles.reshape(-1, 3)}
    counts = {c: int((roles.reshape(-1, 3) == c).all(-1).sum()) for c in colors}
    assert sorted(counts.values()) == [10, 16, 38]   # 38 of 64 pruned, 16 base tokens, 10 other kept


def test_viz_needs_a_method(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "x", "--random-weights", "tiny", "--viz-prune", str(tmp_path)])
    assert "--viz-prune needs" in capsys.readouterr().err


def test_cli_caching(tmp_path, tokenizer_dir):
    common = ["--prompt", "the cat", "--random-weights", "tiny", "--H", "32", "--W", "32", "--tokenizer", tokenizer_dir]
    sample.main(common + ["--steps", "50", "--preset", "dato-coco", "--outdir", str(tmp_path)])
    accel = json.loads(Image.open(tmp_path / "00000.png").text["parameters"])["acceleration"]
    assert accel["prune"]["method"] == "dato" and accel["cache"]["depths"][:3] == [12, 1, 1]
    sample.main(common + ["--steps", "3", "--cache", "dato", "--cache-schedule", "12, 0, 1, 2",
                          "--prune", "tome", "--prune-schedule", "0.5,0.4,0.3,0.2", "--outdir", str(tmp_path)])
    accel = json.loads(Image.open(tmp_path / "00001.png").text["parameters"])["acceleration"]
    assert accel["cache"]["depths"] == [12, 0, 1, 2] and accel["prune"]["schedule"] == [0.5, 0.4, 0.3, 0.2]
    sample.main(common + ["--steps", "4", "--sampler", "ddim", "--cache", "nonuniform", "--cache-interval", "2",
                          "--cache-center", "1", "--outdir", str(tmp_path)])


@pytest.mark.parametrize("args,match", [
    (["--preset", "dato-fixed"], "51 entries, but this run makes 11 UNet calls"),
    (["--preset", "dato-fixed", "--prune", "sito"], "leave out --prune and --cache"),
    (["--cache-schedule", "12,1"], "use it with --cache dato"),
    (["--cache", "dato", "--cache-schedule", "12,1"], "2 entries, but this run makes 11"),
    (["--cache", "dato", "--cache-schedule", "1," * 10 + "1"], "first call"),
    (["--cache", "uniform", "--cache-depth", "14"], "cache depth"),
    (["--prune-schedule", "0.5"], "needs a pruning method"),
    (["--prune", "dato", "--prune-schedule", "0.5,0.9"], "prune ratio 0.9 out of range"),
    (["--prune-ratio", "0.3"], "--prune-ratio given without a pruning method"),
    (["--preset", "dato-coco", "--prune-recover", "base", "--cache-depth", "1"], "leave out --prune-recover, --cache-depth"),
    (["--cache-interval", "3"], "--cache-interval: no effect with --cache none"),
    (["--prune", "tome", "--prune-recover", "base"], "--prune-recover: no effect with --prune tome"),
    (["--cache", "uniform", "--cache-power", "1.2"], "--cache-power: no effect with --cache uniform"),
    (["--cache", "dato", "--cache-schedule", "12,1", "--cache-depth", "1"], "--cache-depth: no effect with --cache dato")])
def test_cli_cache_errors(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "x", "--steps", "10", "--ckpt", str(tmp_path / "missing.safetensors")] + args)
    assert match in capsys.readouterr().err
