"""The generation API (sampler/generate.py) on the TINY preset with a synthesized tokenizer:
load once, render many settings, images carry their settings, the writer never overwrites."""
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from accel import PRESETS, Acceleration
from cache import CacheSchedule
from lab.run_config import LAB
from model import TINY, random_weights
from model.config import SD1
from prune import token_method
from prune.viz import PruneViz
from sampler.generate import Sampling, check_outdir, check_size, generate, save_png, save_pngs

RUN = Sampling(steps=4, size=(64, 48))


@pytest.fixture(scope="module")
def sd(tokenizer_dir):
    return random_weights(TINY, tokenizer=tokenizer_dir)


def pixels(image):
    return np.asarray(image).astype(int)


def params(image):
    return json.loads(image.info["parameters"])


def test_images_carry_their_settings(sd):
    images = generate(sd, ["the cat"] * 3, Sampling(steps=4, seed=7, size=(64, 48), batch_size=2))
    assert len(images) == 3 and images[2].size == (48, 64) and images[2].mode == "RGB"
    p = params(images[2])
    assert p["prompt"] == "the cat" and p["seed"] == 9 and p["steps"] == 4 and p["sampler"] == "plms"
    assert p["scale"] == 7.5 and p["H"] == 64 and p["W"] == 48 and p["dtype"] == "float32"
    assert p["checkpoint"] == "random weights: tiny" and p["acceleration"] is None


def test_a_str_is_one_prompt(sd):
    assert len(generate(sd, "the cat", RUN)) == 1


def test_same_prompt_and_seed_same_image(sd):
    a, b = generate(sd, ["the cat"], RUN)[0], generate(sd, ["the cat"], RUN)[0]
    assert np.array_equal(pixels(a), pixels(b))
    other = generate(sd, ["the cat"], Sampling(steps=4, size=(64, 48), seed=43))[0]
    assert not np.array_equal(pixels(a), pixels(other))


def test_image_k_uses_seed_plus_k(sd):
    """The second image of a seed-10 batch is the image of seed 11 alone (up to batched-BLAS rounding)."""
    batch = generate(sd, ["the cat"] * 2, Sampling(steps=4, size=(64, 48), seed=10, batch_size=2))
    alone = generate(sd, ["the cat"], Sampling(steps=4, size=(64, 48), seed=11))
    assert np.abs(pixels(batch[1]) - pixels(alone[0])).max() <= 2


def test_latents_on_request_and_shape_from_the_config(sd):
    images, latents = generate(sd, ["the cat", "a cat"], RUN, latents=True)
    f = TINY.vae.factor
    assert latents.shape == (2, TINY.vae.z_channels, 64 // f, 48 // f) and len(images) == 2


def test_many_accelerations_from_one_model(sd):
    """One loaded model renders every method; the baseline is the plain run, bit for bit."""
    plain = pixels(generate(sd, ["the cat"], RUN)[0])
    for accel in (Acceleration(token_method("sito", ratio=0.0)), PRESETS["deepcache-n5"].acceleration()):
        image = generate(sd, ["the cat"], Sampling(steps=4, size=(64, 48), accel=accel))[0]
        assert params(image)["acceleration"] is not None
        if accel.cache is None:
            assert np.array_equal(pixels(image), plain)


def test_dtype_and_attention_are_applied(tokenizer_dir):
    sd = random_weights(TINY, tokenizer=tokenizer_dir)
    image = generate(sd, "the cat", Sampling(steps=2, size=(32, 32), dtype="bf16", attention="math"))[0]
    assert params(image)["dtype"] == "bfloat16" and params(image)["attention"] == "math"
    assert sd.unet.out[2].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "^steps must be"), (dict(steps=2.5), "^steps"), (dict(scale=math.nan), "^scale must be a finite"),
    (dict(scale=math.inf), "^scale must be a finite"), (dict(sampler="heun"), "^sampler 'heun' is an unknown sampler"),
    (dict(sampler="ddim", eta=math.nan), "^eta must be a finite"), (dict(eta=0.3), "^eta must be 0 .*plms takes no"),
    (dict(seed=1.5), "^seed 1.5: must be a whole number between 0 and 2"), (dict(dtype="int8"), "^dtype 'int8'"),
    (dict(attention="flash"), "^attention"), (dict(batch_size=0), "^batch_size \\(images per batch\\) must be >= 1"),
    (dict(size=(64,)), "^size must be"), (dict(size=(-64, 64)), "^H -64 must be a positive"),
    (dict(size=128), "^size must be"), (dict(scale=1e308), "^scale \\(guidance\\) must be between 0 and 100"),
    (dict(accel=Acceleration(token_method("dato", schedule=(0.5,) * 3))),
                                          "3 ratios, but this run makes 51")])
def test_bad_settings_are_refused_at_once(kw, match):
    """The API names its own arguments (the command-line tools name their flags: tests/test_cli.py)."""
    with pytest.raises(ValueError, match=match) as refused:
        Sampling(**kw)
    assert "--" not in str(refused.value)


@pytest.mark.parametrize("prompts,seed,match", [
    ([], 0, "non-empty list"), ([1, 2], 0, "non-empty list"), (["a"], -1, "between 0 and 2\\*\\*64 - 1"),
    (["a"], 2 ** 70, "^seed")])
def test_bad_prompts_and_seed_ranges_fail_before_sampling(sd, prompts, seed, match):
    with pytest.raises(ValueError, match=match):
        generate(sd, prompts, Sampling(steps=2, seed=seed, size=(32, 32)))


def test_the_largest_seed_works_and_the_next_image_wraps_to_seed_0(sd):
    """Image k uses seed + k mod 2**64 (torch's seed range), so any seed takes any number of images."""
    last, wrapped = generate(sd, ["the cat"] * 2, Sampling(steps=2, seed=2 ** 64 - 1, size=(32, 32)))
    assert [params(last)["seed"], params(wrapped)["seed"]] == [2 ** 64 - 1, 0]
    first = generate(sd, "the cat", Sampling(steps=2, seed=0, size=(32, 32)))[0]
    assert np.abs(pixels(wrapped) - pixels(first)).max() <= 2


def test_size_must_fit_the_vae(sd):
    with pytest.raises(ValueError, match="^H 30 must be a positive multiple of 8"):
        generate(sd, "x", Sampling(steps=2, size=(30, 32)))
    with pytest.warns(UserWarning, match="far beyond"):
        with pytest.raises(ValueError, match="^W 31"):   # the warning comes first, the bad W still fails
            generate(sd, "x", Sampling(steps=2, size=(512, 31)))


def test_a_size_below_what_the_unet_downsamples_is_refused_or_warned():
    """The lab model (VAE factor 4, 3 UNet halvings) needs 32 px; below 16 the latent has nothing left."""
    with pytest.raises(ValueError, match="^H 12 px is below this model's smallest size, 32 px: its latent \\(3\\)"):
        check_size(LAB, (12, 12))
    with pytest.warns(UserWarning, match="^W 16 px is below .* mostly noise"):
        assert check_size(LAB, (32, 16)) == (32, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_size(SD1, (64, 64)) == (64, 64) and check_size(LAB, None) == (128, 128)


def test_a_non_finite_latent_is_refused_not_decoded_to_black(sd):
    weight = sd.unet.out[2].weight
    kept = weight.clone()
    try:
        weight.data[0] = float("inf")
        with pytest.raises(ValueError, match="^images 0-1: the sampled latent holds NaN or inf"):
            generate(sd, ["a", "b"], Sampling(steps=2, size=(32, 32), batch_size=2))
    finally:
        weight.data.copy_(kept)


def test_writer_numbers_files_and_never_overwrites(sd, tmp_path):
    images = generate(sd, ["the cat", "a cat"], RUN)
    out = tmp_path / "new" / "folder"
    first = save_pngs(images, str(out))
    assert [p.rsplit("/", 1)[1] for p in first] == ["00000.png", "00001.png"]
    before = pixels(Image.open(first[0]))
    second = save_pngs(images[:1], str(out))
    assert second[0].endswith("00002.png") and np.array_equal(pixels(Image.open(first[0])), before)
    assert json.loads(Image.open(second[0]).text["parameters"])["prompt"] == "the cat"
    with pytest.raises(FileExistsError):
        save_png(images[1], first[0])


def test_outdir_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_outdir(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="cannot be created"):
        check_outdir(str(tmp_path / "file" / "sub"))
    check_outdir(str(tmp_path / "a" / "b"))
    check_outdir(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]   # checking leaves nothing behind
    for images, message in ((["not an image"], "got str"), (Image.new("RGB", (4, 4)), "got one image: put it")):
        with pytest.raises(ValueError, match=message):   # refused before the folder is made
            save_pngs(images, tmp_path / "pngs")
    assert not (tmp_path / "pngs").exists()
    if os.path.isdir("/proc/self"):   # writable by its permission bits (as root), yet nothing can be written there
        with pytest.raises(ValueError, match="cannot be created"):
            check_outdir("/proc/forbidden")


def test_a_negative_prompt_without_guidance_is_said_to_be_unused():
    with pytest.warns(UserWarning, match="the negative prompt is unused at guidance scale 1"):
        Sampling(scale=1, negative_prompt="a blue square")


@pytest.mark.parametrize("method", [token_method("todo", factor=8), token_method("tome", sx=8, sy=8, ratio=0.5)])
def test_a_token_method_that_fits_no_block_is_refused(sd, method):
    """At 32 px the tiny model's latent is 4x4: an 8x8 cell or factor would silently prune nothing."""
    with pytest.raises(ValueError, match="acts on no transformer block at a 4x4 latent .* largest block grid is 4x4"):
        generate(sd, "x", Sampling(steps=2, size=(32, 32), accel=Acceleration(method)))
    generate(sd, "x", Sampling(steps=2, size=(64, 64), accel=Acceleration(method)))   # an 8x8 latent: it fits


@pytest.mark.parametrize("viz,message", [
    (dict(block="output_blocks.5.1.transformer_blocks.0"), "is not acted on by the token method"),
    (dict(block="middle_block.0"), "is not a transformer block"),
    (dict(row=5), "row 5 is not a row of this run's batches of 2")])
def test_a_picture_block_the_method_does_not_act_on_is_refused(sd, tmp_path, viz, message):
    accel = Acceleration(token_method("sito"), viz=PruneViz(str(tmp_path / "viz"), **viz))
    with pytest.raises(ValueError, match=message):
        generate(sd, "x", Sampling(steps=2, size=(32, 32), accel=accel))
    assert not (tmp_path / "viz").exists()


@pytest.mark.parametrize("make,message", [
    (lambda: Acceleration(viz=PruneViz("v")), "give a token method"),
    (lambda: Acceleration(viz="v"), "PruneViz or None"),
    (lambda: Acceleration(viz=PruneViz("v"), prune=token_method("todo")), "^viz draws which tokens"),
    (lambda: PruneViz(""), "^folder must name a folder for the pictures"),
    (lambda: PruneViz("v", cell=0), "cell must be a whole number >= 1"),
    (lambda: PruneViz("v", row=1.5), "row must be a whole number"),
    (lambda: token_method("sito", noise_alpha=-1), "^noise_alpha must be >= 0"),
    (lambda: CacheSchedule("nonuniform", center=-1), "^center \\(of the non-uniform schedule\\)")])
def test_settings_are_checked_when_made_and_name_the_setting_not_a_flag(make, message):
    """The API's errors name its own settings; sample.py names the flag (tests/test_cli.py)."""
    with pytest.raises(ValueError, match=message) as refused:
        make()
    assert "--" not in str(refused.value)


def test_generate_names_what_it_was_given_instead(sd):
    with pytest.raises(ValueError, match="settings must be a Sampling, got str"):
        generate(sd, "x", "plms")
    with pytest.raises(ValueError, match="takes a loaded model .* got str"):
        generate("lab/lab-sd.safetensors", "x", Sampling(steps=2))


@pytest.mark.parametrize("folder,message", [("README.md", "is a file, not a folder"), ("", "is empty"),
                                            (None, "writes into a folder path")])
def test_save_pngs_names_a_bad_folder(sd, folder, message):
    images = generate(sd, "x", Sampling(steps=2, size=(32, 32)))
    with pytest.raises(ValueError, match=message):
        save_pngs(images, folder)


def test_numbering_skips_names_that_only_look_like_numbers(sd, tmp_path):
    (tmp_path / "².png").write_bytes(b"")   # str.isdigit() says yes, int() says no
    assert save_pngs(generate(sd, "x", Sampling(steps=2, size=(32, 32))), tmp_path)[0].endswith("00000.png")
