"""sample.py end to end on the TINY presets with a synthesized tokenizer: files, metadata, flags,
and bad input refused in one line before any heavy work, leaving nothing behind."""
import json

import numpy as np
import pytest
from PIL import Image

import sample
from model.hardware import native_bf16_cpu

TINY_RUN = ["--random-weights", "tiny", "--steps", "2", "--H", "32", "--W", "32"]


def params(path):
    return json.loads(Image.open(path).text["parameters"])


def cli(tmp_path, tokenizer_dir, *args):
    return sample.main([*TINY_RUN, "--tokenizer", tokenizer_dir, "--outdir", str(tmp_path), *args])


def test_writes_numbered_pngs_with_metadata(tmp_path, tokenizer_dir, capsys):
    paths = cli(tmp_path, tokenizer_dir, "--prompt", "the cat", "--n-samples", "2", "--n-iter", "2", "--seed", "7")
    assert f"4 image(s): {tmp_path}/00000.png .. 00003.png  |" in capsys.readouterr().out   # the files, by name
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    p = params(paths[3])
    assert p["prompt"] == "the cat" and p["seed"] == 10 and p["steps"] == 2
    assert p["checkpoint"] == "random weights: tiny"
    again = cli(tmp_path, tokenizer_dir, "--prompt", "the cat", "--n-samples", "2", "--seed", "7")
    assert again[0].endswith("00004.png")   # the same batch again: the same pixels (a batch of another
    for a, b in zip(again, paths[:2], strict=True):   # size may round differently on some CPUs' GEMMs)
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_default_precision_follows_the_cpu(tmp_path, tokenizer_dir, capsys):
    path = cli(tmp_path, tokenizer_dir, "--prompt", "a red cube")[0]
    expected = "bfloat16" if native_bf16_cpu() else "float32"
    assert params(path)["dtype"] == expected and f"{expected} on cpu" in capsys.readouterr().out


def test_prompt_file_batches(tmp_path, tokenizer_dir):
    (tmp_path / "prompts.txt").write_text("the cat\n\na photo of the cat\nthe\n")
    paths = cli(tmp_path / "out", tokenizer_dir, "--from-file", str(tmp_path / "prompts.txt"), "--n-samples", "2")
    assert [params(p)["prompt"] for p in paths] == ["the cat", "a photo of the cat", "the"]


def test_ldm_spellings_are_accepted(tmp_path, tokenizer_dir):
    (tmp_path / "prompts.txt").write_text("the cat\n")
    paths = sample.main(["--random-weights", "tiny", "--H", "32", "--W", "32", "--tokenizer", tokenizer_dir,
                         "--outdir", str(tmp_path / "out"), "--from_file", str(tmp_path / "prompts.txt"),
                         "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "3", "--plms", "--ddim_eta", "0"])
    assert len(paths) == 2 and params(paths[0])["steps"] == 3 and params(paths[0])["sampler"] == "plms"


def test_help_shows_defaults_and_limits(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("images per batch (default: 1)", "else 50, the papers' PLMS-50", "1 to 999", "(default: 42)",
                     "(default: outputs)", "else plms", "--n-samples N_SAMPLES, --n_samples N_SAMPLES"):
        assert expected in text


@pytest.mark.parametrize("args,match", [
    (["--from-file", "nope.txt"], "does not exist"), ([], "give a prompt"),
    (["--prompt", "x", "--from-file", "p.txt"], "not both"),
    (["--prompt", "x", "--scale", "nan"], "--scale must be a finite number"),
    (["--prompt", "x", "--scale", "inf"], "--scale must be a finite number"),
    (["--prompt", "x", "--sampler", "ddim", "--eta", "nan"], "--eta must be a finite number"),
    (["--prompt", "x", "--prune", "sito", "--prune-noise", "nan"], "--prune-noise must be a finite number"),
    (["--prompt", "x", "--seed", str(2 ** 70)], "--seed"),
    (["--prompt", "x", "--seed", "-1"], "between 0 and 2**64 - 1"),
    (["--prompt", "x", "--device", "foo"], "--device 'foo' is not a device"),
    (["--prompt", "x", "--device", "cuda:7"], "--device cuda:7"),
    (["--prompt", "x", "--steps", "0"], "--steps must be a whole number from 1 to 999"),
    (["--prompt", "x", "--n-samples", "0"], "--n-samples"),
    (["--prompt", "x", "--preset", "deepcache-n3", "--prune", "sito"], "fixes caching and prunes nothing"),
    (["--prompt", "x", "--preset", "dato-coco", "--steps", "3"], "preset dato-coco is for PLMS-50"),
    (["--prompt", "x", "--preset", "dato-fixed", "--prune", "sito"], "leave out --prune sito"),
    (["--prompt", "x", "--threads", "0"], "--threads must be from 1 to"),
    (["--prompt", "x", "--n-iter", "0"], "--n-iter (how many times the batches repeat) must be >= 1"),
    (["--prompt", "x", "--threads", "100000"], "--threads must be from 1 to this machine's"),
    (["--prompt", "x", "--prune", "sito", "--viz-prune", "README.md/viz"], "--viz-prune 'README.md/viz' cannot be"),
    (["--from-file", "tests"], "is a folder; give a text file"),
    (["--prompt", "x", "--cache", "nonuniform", "--cache-center", "1000"], "--cache-center 1000 (of the non-uniform"),
    (["--prompt", "x", "--cache", "nonuniform", "--cache-center", "-1"], "--cache-center (of the non-uniform")])
def test_bad_input_is_one_line_before_loading(tmp_path, capsys, args, match):
    """The checkpoint does not exist: each argument error must come first, and create nothing."""
    with pytest.raises(SystemExit):
        sample.main(args + ["--ckpt", str(tmp_path / "missing.safetensors"), "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err   # one line: no usage block, no traceback
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry, match", [
    ({"depths": [12, 1.5, 1, 12, 1]}, "cache depths must be a whole number"),
    ({"sampler": "heun"}, 'its field "sampler" \'heun\' is an unknown sampler; choose one of plms'),
    ({"steps": 0}, 'its field "steps" must be a whole number from 1 to 999, got 0; fix the file'),
    ({"depths": [12, 1]}, "2 depths for PLMS-4, which makes 5 UNet calls"),
    ({"prune": [1, 2]}, 'its field "prune" must be a token method\'s settings (an object) or null'),
    ({"depths": [1, 1, 1, 12, 1]}, "the first call has nothing cached to reuse"),
    ({"prun": {"method": "tome", "ratio": 0.5}}, "unknown field 'prun'; a schedule's fields are sampler, steps, "
                                                 "depths, prune,"),
])
def test_a_bad_schedule_file_is_named_with_its_field(tmp_path, capsys, entry, match):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"sampler": "plms", "steps": 4, "depths": [12, 1, 1, 12, 1], "prune": None, **entry}))
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "x", "--steps", "4", "--preset", str(path), "--ckpt", str(tmp_path / "none.ckpt"),
                     "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert match in err and str(path) in err and "--steps must" not in err and len(err.splitlines()) == 1, err


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_bytes(b"a red circle\n\xff\xfe latin-1 \xe9\n")
    with pytest.raises(SystemExit):
        sample.main(["--from-file", str(tmp_path / "prompts.txt"), "--outdir", str(tmp_path / "out")])
    assert "prompts.txt' (--from-file) is not UTF-8 text (byte 0xff at offset 13); save it as UTF-8" in \
        capsys.readouterr().err


def test_random_lab_weights_take_the_lab_tokenizer(tmp_path):
    """The lab model's text encoder has 564 token ids: its random weights need its own tokenizer, by default."""
    paths = sample.main(["--random-weights", "lab", "--prompt", "a red circle", "--steps", "1", "--H", "32",
                         "--W", "32", "--outdir", str(tmp_path)])
    assert len(paths) == 1


def test_outdir_that_is_a_file(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit):
        sample.main([*TINY_RUN, "--prompt", "x", "--outdir", str(tmp_path / "taken")])
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("size,match", [(["--H", "0"], "--H 0 must be a positive multiple of the VAE factor (8 for SD"),
                                        (["--W", "36"], "--W 36 must be a positive multiple of 8")])
def test_sizes_the_vae_cannot_decode(tmp_path, tokenizer_dir, capsys, size, match):
    with pytest.raises(SystemExit):
        sample.main(["--random-weights", "tiny", "--steps", "2", "--prompt", "x", "--tokenizer", tokenizer_dir,
                     "--outdir", str(tmp_path / "out"), *size])
    assert match in capsys.readouterr().err


def test_failed_run_leaves_no_outdir(tmp_path, tokenizer_dir, capsys):
    """An error found after loading (a size the VAE cannot decode) writes nothing, creates nothing."""
    with pytest.raises(SystemExit):
        sample.main(["--random-weights", "tiny", "--steps", "2", "--H", "36", "--W", "32", "--prompt", "x",
                     "--tokenizer", tokenizer_dir, "--outdir", str(tmp_path / "out")])
    assert "multiple of 8" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_interrupt_is_one_line(tmp_path, tokenizer_dir, monkeypatch):
    real = sample.generate_batches

    def interrupted(*args, **kwargs):
        for n, batch in enumerate(real(*args, **kwargs)):
            if n == 1:
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(sample, "generate_batches", interrupted)
    with pytest.raises(SystemExit, match="interrupted after 1 image"):
        cli(tmp_path, tokenizer_dir, "--prompt", "x", "--n-iter", "3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png"]


def test_unknown_viz_block(tmp_path, tokenizer_dir, capsys):
    with pytest.raises(SystemExit):
        cli(tmp_path / "out", tokenizer_dir, "--prompt", "x", "--prune", "sito", "--viz-prune", str(tmp_path / "viz"),
            "--viz-block", "input_blocks.1.1.transformer_blocks.O")
    assert "--viz-block 'input_blocks.1.1.transformer_blocks.O' is not a transformer block" in capsys.readouterr().err


def test_a_method_that_acts_on_nothing_names_its_flag(tmp_path, tokenizer_dir, capsys):
    with pytest.raises(SystemExit):
        cli(tmp_path / "out", tokenizer_dir, "--prompt", "x", "--prune", "todo", "--prune-factor", "8")
    assert "--prune todo acts on no transformer block at a 4x4 latent" in capsys.readouterr().err


def test_missing_tokenizer_is_a_clear_exit(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(SystemExit, match="must contain vocab.json and merges.txt"):
        cli(tmp_path / "out", str(tmp_path / "tok"), "--prompt", "x")


def test_empty_prompt_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        sample.read_prompts(from_file=str(tmp_path / "empty.txt"))


def test_a_byte_order_mark_is_not_prompt_text(tmp_path):
    """Windows editors start UTF-8 files with U+FEFF; it would become part of the first prompt."""
    (tmp_path / "bom.txt").write_bytes("\ufeffa red circle\na blue square\n".encode())
    assert sample.read_prompts(from_file=str(tmp_path / "bom.txt")) == ["a red circle", "a blue square"]


def test_prediction_override_with_random_weights(tmp_path, tokenizer_dir):
    paths = cli(tmp_path, tokenizer_dir, "--prompt", "x", "--prediction", "v")
    assert params(paths[0])["prediction"] == "v"


def test_pruning_and_pictures(tmp_path, tokenizer_dir):
    sample.main(["--prompt", "the cat", "--random-weights", "tiny", "--steps", "3", "--H", "64", "--W", "64",
                 "--tokenizer", tokenizer_dir, "--outdir", str(tmp_path / "out"), "--prune", "sito",
                 "--prune-ratio", "0.6", "--prune-layers", "attn1,attn2", "--viz-prune", str(tmp_path / "viz")])
    sample.main(["--prompt", "the cat", "--random-weights", "tiny", "--steps", "2", "--H", "32", "--W", "32",
                 "--tokenizer", tokenizer_dir, "--outdir", str(tmp_path / "out"), "--prune", "dato",
                 "--prune-base", "local_random"])
    assert params(tmp_path / "out" / "00001.png")["acceleration"]["prune"]["base_tokens"] == "local_random"
    accel = params(tmp_path / "out" / "00000.png")["acceleration"]
    assert accel["prune"]["method"] == "sito" and accel["prune"]["layers"] == ["attn1", "attn2"]
    pictures = sorted(p.name for p in (tmp_path / "viz").iterdir())
    assert pictures == [f"seed42_call{i:03d}.png" for i in range(4)]   # PLMS-3: 4 UNet calls
    roles = np.asarray(Image.open(tmp_path / "viz" / pictures[0]))[::4, ::4]
    assert roles.shape[:2] == (8, 8)
    colors = {tuple(c) for c in roles.reshape(-1, 3)}
    counts = {c: int((roles.reshape(-1, 3) == c).all(-1).sum()) for c in colors}
    assert sorted(counts.values()) == [10, 16, 38]   # 38 of 64 pruned, 16 base tokens, 10 other kept


def test_todo_from_the_command_line(tmp_path, tokenizer_dir, capsys):
    """sample.py --prune todo renders, records its settings, and differs from the plain image; its
    pictures are refused (ToDo removes no tokens)."""
    common = ["--prompt", "the cat", "--random-weights", "tiny", "--steps", "3", "--H", "64", "--W", "64",
              "--tokenizer", tokenizer_dir, "--outdir", str(tmp_path / "out")]
    sample.main(common)
    sample.main(common + ["--prune", "todo", "--prune-factor", "2", "--prune-stop", "0.25"])
    prune = params(tmp_path / "out" / "00001.png")["acceleration"]["prune"]
    assert prune == {"method": "todo", "max_downsample": 1, "layers": ["attn1"], "factor": 2,
                     "mode": "nearest-exact", "stop": 0.25}
    plain, todo = (np.asarray(Image.open(tmp_path / "out" / f"0000{k}.png")) for k in (0, 1))
    assert plain.shape == todo.shape and (plain != todo).any()
    with pytest.raises(SystemExit):
        sample.main(common + ["--prune", "todo", "--viz-prune", str(tmp_path / "viz")])
    assert "todo removes none" in capsys.readouterr().err


def test_viz_needs_a_method(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "x", "--random-weights", "tiny", "--viz-prune", str(tmp_path)])
    assert "--viz-prune draws a token method's plans" in capsys.readouterr().err


def test_caching(tmp_path, tokenizer_dir):
    common = ["--prompt", "the cat", "--random-weights", "tiny", "--H", "32", "--W", "32", "--tokenizer", tokenizer_dir]
    sample.main(common + ["--steps", "50", "--preset", "dato-coco", "--outdir", str(tmp_path)])
    accel = params(tmp_path / "00000.png")["acceleration"]
    assert accel["prune"]["method"] == "dato" and accel["cache"]["depths"][:3] == [12, 1, 1]
    sample.main(common + ["--steps", "3", "--cache", "dato", "--cache-schedule", "12, 0, 1, 2",
                          "--prune", "tome", "--prune-schedule", "0.5,0.4,0.3,0.2", "--outdir", str(tmp_path)])
    accel = params(tmp_path / "00001.png")["acceleration"]
    assert accel["cache"]["depths"] == [12, 0, 1, 2] and accel["prune"]["schedule"] == [0.5, 0.4, 0.3, 0.2]
    sample.main(common + ["--steps", "4", "--sampler", "ddim", "--cache", "nonuniform", "--cache-interval", "2",
                          "--cache-center", "1", "--outdir", str(tmp_path)])
    assert (tmp_path / "00002.png").exists()
    sample.main(common + ["--steps", "4", "--sampler", "dpmpp-2m", "--gate", "2", "--outdir", str(tmp_path)])
    assert params(tmp_path / "00003.png")["acceleration"]["gate"] == 2
    sample.main(common + ["--steps", "4", "--sampler", "dpmpp-2m", "--guidance-stop", "0.5", "--outdir", str(tmp_path)])
    stopped = params(tmp_path / "00004.png")
    assert stopped["acceleration"]["guidance"]["stop"] == 0.5 and stopped["guidance_stopped_at"] in (-1, 1, 2, 3)


@pytest.mark.parametrize("args,match", [
    (["--cache-schedule", "12,1"], "use it with --cache dato"),
    (["--cache", "dato", "--cache-schedule", "12,1"], "2 entries, but this run makes 11"),
    (["--cache", "dato", "--cache-schedule", "1," * 10 + "1"], "first call"),
    (["--cache", "uniform", "--cache-depth", "14"], "cache depth"),
    (["--prune-schedule", "0.5"], "needs a token method"),
    (["--prune", "todo", "--prune-schedule", "0.5"], "todo takes no per-call ratios"),
    (["--prune", "todo", "--prune-ratio", "0.3"], "--prune-ratio: no effect with --prune todo"),
    (["--prune", "sito", "--prune-factor", "2"], "--prune-factor: no effect with --prune sito (a setting of todo)"),
    (["--prune", "todo", "--prune-factor", "0"], "factor must be a whole number >= 2"),
    (["--prune", "dato", "--prune-schedule", "0.5,0.9"], "prune ratio 0.9 out of range"),
    (["--prune-ratio", "0.3"], "--prune-ratio given without a token method"),
    (["--preset", "dato-coco", "--prune-recover", "base", "--cache-depth", "1"],
     "leave out --prune-recover, --cache-depth"),
    (["--cache-interval", "3"], "--cache-interval: no effect with --cache none"),
    (["--prune", "tome", "--prune-recover", "base"], "--prune-recover: no effect with --prune tome"),
    (["--prune", "sito", "--prune-base", "local_random"], "--prune-base: no effect with --prune sito"),
    (["--cache", "uniform", "--cache-power", "1.2"], "--cache-power: no effect with --cache uniform"),
    (["--cache", "dato", "--cache-schedule", "12,1", "--cache-depth", "1"],
     "--cache-depth: no effect with --cache dato"),
    (["--cache-order", "1"], "--cache-order: no effect with --cache none"),
    (["--cache", "uniform", "--cache-order", "3"], "cache order (forecast) must be one of (0, 1, 2)"),
    (["--guidance-outside", "reuse"], "give the window too"),
    (["--guidance-window", "1"], "guidance window must be (σ_lo, σ_hi)"),
    (["--guidance-window", "5,1"], "0 <= σ_lo < σ_hi"),
    (["--guidance-window", "1,5", "--guidance-schedule", "both"], "not both"),
    (["--guidance-schedule", "both,reuse"], "2 modes, but this run makes 11"),
    (["--guidance-schedule", "reuse" + ",both" * 10], "no guided call is made before it"),
    (["--guidance-schedule", "both" + ",guided" * 10], "guidance modes must be one of both, cond, reuse"),
    (["--skip", "1"], "indices >= 2"),
    (["--skip", "3,4"], "must not follow one another"),
    (["--skip", "11"], "skipped call 11 is not a UNet call of this run"),
    (["--timesteps", "999,500"], "2 timesteps for a run of 10 steps"),
    (["--gate", "0"], "an index >= 1"),
    (["--preset", ""], "--preset is empty"),
    (["--prune", "dato", "--prune-schedule", " "], "--prune-schedule is empty"),
    (["--viz-block", "input_blocks.1.1.transformer_blocks.0"], "add --viz-prune DIR"),
    (["--plms", "--sampler", "ddim"], "--plms and --sampler ddim contradict each other"),
    (["--sampler", "dpmpp-2m", "--plms"], "--plms and --sampler dpmpp-2m contradict each other"),
    (["--guidance-stop", "1.5"], "cosine similarity in [0, 1)"),
    (["--guidance-stop", "0.99", "--cache", "uniform"], "cannot be combined with a cache or a gate"),
    (["--gate", "11"], "gate call 11 is not a UNet call of this run"),
    (["--gate", "4", "--guidance-schedule", ",".join(["both"] * 11)], "its guidance must be cond"),
    (["--preset", "ays-10", "--timesteps", "999,500"], "fixes its timesteps; leave out --timesteps"),
    (["--preset", "lab/schedules/dpmpp-2m-10.json#1@dpmpp-2m:10"], "'@dpmpp-2m:10' is the run of a --methods entry"),
    (["--n-samples", "0"], "--n-samples (images per batch) must be >= 1, got 0"),
    (["--preset", "deepcache-n3", "--cache", "none"], "--preset deepcache-n3 fixes caching and pruning; leave out "
                                                      "--cache none"),
    (["--preset", "dato-coco", "--prune", "none"], "leave out --prune none"),
    (["--scale", "1000"], "--scale (guidance) must be between 0 and 100"),
    (["--sampler", "ddim", "--eta", "-1"], "--eta must be >= 0")])
def test_cache_errors(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "x", "--steps", "10", "--ckpt", str(tmp_path / "missing.safetensors")] + args)
    assert match in capsys.readouterr().err


