"""Loading: official single files (.safetensors / .ckpt), EMA, diffusers folders, prediction
guessing, and clear errors on bad input. Tiny presets in the official key layout; diffusers'
own converters are the oracle for the renamed tensors."""
import json
import pickle
import shutil
import warnings
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from conftest import CLIP, OPENCLIP, UNET, VAE, layout_shapes, random_state
from lab.export import save_checkpoint
from model import TINY, TINY_SD2, CheckpointError, load_checkpoint, random_weights
from model.hardware import resolve_dtype


class ModelCheckpoint:
    """Stands for the pytorch-lightning callback objects pickled into official .ckpt files."""

    def __init__(self):
        self.best_model_path = "/some/where.ckpt"


class Tripwire:
    """A pickled object whose code must never run: loading skips it without unpickling it for real."""

    def __init__(self):
        self.armed = True

    def __setstate__(self, state):
        raise AssertionError("code from the checkpoint ran")


class Settings(dict):
    """A dict subclass pickled into a .ckpt: no inert stub can stand in for it, so the file is refused."""


def save(state, path, wrap=False):
    path = str(path)
    if path.endswith(".safetensors"):
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 470000, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}
                   if wrap else state, path)
    return path


def text_state(sd):
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.text.transformer.state_dict().items() if not k.endswith("position_ids")}


def expected_text(config, state):
    """The checkpoint's text weights in transformers naming, converted by diffusers for SD2."""
    if config.version == "sd1":
        return {k[len(CLIP):]: v for k, v in state.items() if k.startswith(CLIP) and "position_ids" not in k}
    t = config.text
    hf = CLIPTextModel(CLIPTextConfig(hidden_size=t.width, intermediate_size=t.mlp, num_hidden_layers=t.layers,
                                      num_attention_heads=t.heads, vocab_size=t.vocab_size))
    converted = convert_open_clip_checkpoint(hf, state)
    converted.pop("text_projection.weight", None)
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in converted.items()
            if not k.startswith("text_model.encoder.layers." + str(t.layers))}


@pytest.mark.parametrize("config", [TINY, TINY_SD2], ids=["sd1", "sd2"])
@pytest.mark.parametrize("ext,wrap", [(".safetensors", False), (".ckpt", True), (".ckpt", False)])
def test_round_trip(tmp_path, config, ext, wrap):
    state = random_state(layout_shapes(config))
    sd = load_checkpoint(save(state, tmp_path / ("model" + ext), wrap), prediction="eps")
    assert sd.config == config
    for k, v in sd.unet.state_dict().items():
        assert torch.equal(v, state[UNET + k]), k
    for k, v in sd.vae.state_dict().items():
        assert torch.equal(v, state[VAE + k]), k
    expected = expected_text(config, state)
    loaded = text_state(sd)
    assert loaded.keys() == expected.keys()
    for k, v in loaded.items():
        assert torch.equal(v, expected[k]), k


def test_dtype_and_no_grad(tmp_path):
    sd = load_checkpoint(save(random_state(layout_shapes(TINY)), tmp_path / "m.safetensors"), dtype=torch.bfloat16)
    for m in (sd.unet, sd.vae, sd.text):
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in m.parameters())


def test_auto_dtype_follows_the_hardware_and_source_is_recorded(tmp_path):
    path = save(random_state(layout_shapes(TINY)), tmp_path / "m.safetensors")
    sd = load_checkpoint(path, dtype="auto")
    assert sd.unet.out[2].weight.dtype == resolve_dtype("auto", "cpu") and sd.source == path


def test_v_prediction_for_an_sd1_file_warns(tmp_path):
    path = save(random_state(layout_shapes(TINY)), tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="SD 1.x models predict eps"):
        assert load_checkpoint(path, prediction="v").config.prediction == "v"


def test_prefers_ema(tmp_path):
    """v1-5-pruned.ckpt style: training weights under the normal names, EMA under model_ema.*."""
    state = random_state(layout_shapes(TINY))
    ema = {"model_ema." + "diffusion_model" + k[len(UNET):].replace(".", ""): v + 1
           for k, v in state.items() if k.startswith(UNET)}
    sd = load_checkpoint(save({**state, **ema, "model_ema.decay": torch.tensor(0.9999),
                               "model_ema.num_updates": torch.tensor(5)}, tmp_path / "m.safetensors"))
    for k, v in sd.unet.state_dict().items():
        assert torch.equal(v, state[UNET + k] + 1), k


def test_sd2_prediction_guess_and_override(tmp_path, capsys):
    state = random_state(layout_shapes(TINY_SD2))
    key = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    state[key] = torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0)) * 0.2
    path = save(state, tmp_path / "v.safetensors")
    assert load_checkpoint(path).config.prediction == "v"
    assert "guessed v-prediction" in capsys.readouterr().out
    assert load_checkpoint(path, prediction="eps").config.prediction == "eps"
    state[key] = state[key] * 0.1
    assert load_checkpoint(save(state, tmp_path / "eps.safetensors")).config.prediction == "eps"


def diffusers_folder(tmp_path, config, state, tokenizer_dir, prediction="epsilon", old_vae_names=False):
    """A diffusers-format folder made from an official-layout state dict by diffusers' own converters."""
    u, v = config.unet, config.vae
    heads = u.num_heads if not u.head_channels else [u.model_channels * m // u.head_channels for m in u.channel_mult]
    unet_config = dict(sample_size=8, block_out_channels=[u.model_channels * m for m in u.channel_mult],
                       cross_attention_dim=u.context_dim, attention_head_dim=heads,
                       use_linear_projection=u.linear_proj, layers_per_block=u.num_res_blocks)
    vae_config = dict(block_out_channels=[v.ch * m for m in v.ch_mult], layers_per_block=v.num_res_blocks,
                      down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                      latent_channels=4, norm_num_groups=32)
    unet = convert_ldm_unet_checkpoint(state, unet_config)
    vae = convert_ldm_vae_checkpoint({k: t for k, t in state.items() if not k.startswith(VAE + "encoder")}, vae_config)
    if old_vae_names:
        names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        vae = {next((k.replace(f".{a}.", f".{b}.") for a, b in names.items() if f".{a}." in k), k): t
               for k, t in vae.items()}
    text = expected_text(config, state)
    for name, weights, cfg in (("unet", unet, unet_config), ("vae", vae, vae_config), ("text_encoder", text, {})):
        (tmp_path / name).mkdir(parents=True)
        file = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.fp16.safetensors"
        save_file({k: t.contiguous() for k, t in weights.items()}, str(tmp_path / name / file))
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
    (tmp_path / "tokenizer").mkdir()
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizer" / f).write_text(open(f"{tokenizer_dir}/{f}").read())
    return tmp_path


@pytest.mark.parametrize("config", [TINY, TINY_SD2], ids=["sd1", "sd2"])
def test_diffusers_folder_equals_single_file(tmp_path, tokenizer_dir, config):
    state = random_state(layout_shapes(config))
    single = load_checkpoint(save(state, tmp_path / "m.safetensors"), prediction="eps")
    folder = load_checkpoint(diffusers_folder(tmp_path / "folder", config, state, tokenizer_dir,
                                              old_vae_names=config is TINY))
    assert folder.config == single.config
    for a, b in ((folder.unet, single.unet), (folder.vae, single.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(v, text_state(single)[k]) for k, v in text_state(folder).items())
    assert folder.text.tokenize(["the cat"])[0, :4].tolist() == [49406, 514, 516, 49407]


def test_diffusers_folder_prediction(tmp_path, tokenizer_dir):
    state = random_state(layout_shapes(TINY_SD2))
    folder = diffusers_folder(tmp_path, TINY_SD2, state, tokenizer_dir, prediction="v_prediction")
    assert load_checkpoint(folder).config.prediction == "v"
    (folder / "scheduler" / "scheduler_config.json").unlink()   # no record: guessed from the weights
    assert load_checkpoint(folder).config.prediction == "eps"


def test_diffusers_folder_matches_diffusers_models(tmp_path, tokenizer_dir):
    """Beyond names: the converted UNet computes what diffusers' own model computes."""
    state = random_state(layout_shapes(TINY))
    folder = diffusers_folder(tmp_path, TINY, state, tokenizer_dir)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    theirs = UNet2DConditionModel(**cfg).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(state, cfg))
    ours = load_checkpoint(folder).unet
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, c), theirs(x, t, c).sample, atol=1e-5, rtol=1e-4)

    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    theirs = DiffusersVAE(**vae_config).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config), strict=False)  # encoder not in the file
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(folder).vae.decode(x),
                                   theirs.decode(x / 0.18215).sample.clamp(-1, 1), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad input: each a CheckpointError whose message names the problem

def error_of(path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    return str(e.value)


def test_missing_path(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("ext,prefix", [(".safetensors", "not a valid .safetensors file: it is "),
                                        (".ckpt", "not a PyTorch checkpoint: it is ")])
@pytest.mark.parametrize("content,found", [
    (b"", ["an empty file (0 bytes)"]),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90"
     b"014281516\nsize 4265380512\n", ["a Git LFS pointer, not the weights", "`git lfs pull`"]),
    (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n", ["an HTML page (a failed download"]),
    (b"this is not a checkpoint\n" * 10, ["a text file (250 bytes), starts with 'this is not a checkpoint'"]),
], ids=["empty", "lfs", "html", "text"])
def test_file_without_weights_says_what_it_is(tmp_path, ext, prefix, content, found):
    (tmp_path / ("m" + ext)).write_bytes(content)
    msg = error_of(tmp_path / ("m" + ext))
    assert prefix + found[0] in msg and all(f in msg for f in found)
    assert "weights_only" not in msg


def test_binary_junk_ckpt_shows_its_first_bytes(tmp_path):
    (tmp_path / "m.ckpt").write_bytes(bytes(range(256)))
    assert r"not a PyTorch zip or pickle checkpoint (first bytes: b'\x00\x01\x02" in error_of(tmp_path / "m.ckpt")


def test_pickled_objects_are_skipped_without_running_their_code(tmp_path, capsys):
    state = random_state(layout_shapes(TINY))
    path = str(tmp_path / "m.ckpt")
    torch.save({"state_dict": state, "callbacks": {"tripwire": Tripwire()}}, path)
    assert load_checkpoint(path).config == TINY
    assert "ignoring pickled non-tensor objects (test_checkpoint.Tripwire)" in capsys.readouterr().out


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_ckpt_with_objects_that_cannot_be_skipped_is_refused(tmp_path, zipped):
    """Refused for safety, pointing at .safetensors; never the advice to load with weights_only=False."""
    path = str(tmp_path / "m.ckpt")
    torch.save({"state_dict": random_state(layout_shapes(TINY)), "hparams": Settings(lr=1e-4)}, path,
               _use_new_zipfile_serialization=zipped)
    msg = error_of(path)
    assert "the file holds non-tensor Python objects" in msg and "refused for safety" in msg
    assert "could run arbitrary code; use the .safetensors version of this checkpoint instead" in msg
    assert "weights_only" not in msg and "\n" not in msg


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_bare_pickle_that_calls_code_is_refused_as_code_not_as_damage(tmp_path, protocol):
    """A plain pickle (not torch.save's format) whose objects would run code: torch's safe reader cannot
    parse protocols above 2 at all, so without reading its opcodes it would be called a damaged download."""
    path = tmp_path / "m.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "payload": Tripwire()}, protocol=protocol))
    with warnings.catch_warnings(record=True) as caught:   # torch's own protocol note would come before our line
        warnings.simplefilter("always")
        msg = error_of(path)
    assert [str(w.message) for w in caught] == []
    assert "non-tensor Python objects (test_checkpoint.Tripwire) and was refused for safety" in msg, msg
    assert "damaged" not in msg and "download it again" not in msg


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_truncated_file(tmp_path, ext):
    path = save(random_state(layout_shapes(TINY)), tmp_path / ("m" + ext))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    assert "complete" in error_of(path)


def test_unsupported_extension(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert "unsupported file type" in error_of(tmp_path / "m.gguf")


def test_sdxl_text_keys_beside_an_sd1_unet_are_named(tmp_path):
    state = random_state(layout_shapes(TINY))
    state["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    error = error_of(save(state, tmp_path / "xl.safetensors"))
    assert "text-encoder keys of another SD generation beside a SD1 UNet" in error
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in error


def test_inpainting_is_refused(tmp_path):
    state = random_state(layout_shapes(TINY))
    state[UNET + "input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    assert "inpainting" in error_of(save(state, tmp_path / "inpaint.safetensors"))


def test_no_unet(tmp_path):
    state = {k: v for k, v in random_state(layout_shapes(TINY)).items() if not k.startswith(UNET)}
    assert "no Stable Diffusion UNet" in error_of(save(state, tmp_path / "vae.safetensors"))


def test_missing_key_is_named(tmp_path):
    state = random_state(layout_shapes(TINY))
    del state[UNET + "output_blocks.4.1.proj_out.weight"]
    msg = error_of(save(state, tmp_path / "m.safetensors"))
    assert "missing" in msg and "output_blocks.4.1.proj_out.weight" in msg


def test_sd2_missing_the_guessed_key_is_named(tmp_path):
    state = random_state(layout_shapes(TINY_SD2))
    del state[UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"]
    msg = error_of(save(state, tmp_path / "m.safetensors"))
    assert "missing" in msg and "output_blocks.11.1.transformer_blocks.0.norm1.bias" in msg


def test_wrong_shape_is_named(tmp_path):
    state = random_state(layout_shapes(TINY_SD2))
    state[OPENCLIP + "ln_final.weight"] = torch.ones(3)
    msg = error_of(save(state, tmp_path / "m.safetensors"))
    assert "text encoder" in msg and "final_layer_norm.weight" in msg and "wrong shape" in msg


def test_unknown_keys_are_named(tmp_path):
    state = random_state(layout_shapes(TINY))
    state["lora_unet_down_blocks_0.alpha"] = torch.ones(())
    assert "lora_unet_down_blocks_0.alpha" in error_of(save(state, tmp_path / "m.safetensors"))


def test_bad_prediction_argument(tmp_path):
    with pytest.raises(ValueError, match="'eps' or 'v'"):
        load_checkpoint(tmp_path / "whatever.safetensors", prediction="x0")


def test_save_checkpoint_round_trip_with_config_and_tokenizer(tmp_path, tokenizer_dir):
    """A model whose architecture no detection knows loads from the config in the file's metadata,
    with the tokenizer folder recorded beside it; fp16 storage, exact up to that rounding."""
    config = replace(TINY, unet=replace(TINY.unet, model_channels=64), scale_factor=0.5, guidance=3.0)
    sd = random_weights(config, tokenizer=tokenizer_dir)
    shutil.copytree(tokenizer_dir, tmp_path / "tok")
    path = save_checkpoint(sd, str(tmp_path / "m.safetensors"), tokenizer="tok")
    loaded = load_checkpoint(path)
    assert loaded.config == config and loaded.text.tokenizer.name_or_path == str(tmp_path / "tok")
    for ours, theirs in ((loaded.unet, sd.unet), (loaded.vae, sd.vae), (loaded.text, sd.text)):
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b.half().float()), k
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_checkpoint(sd, path)


def test_bad_config_metadata_is_named(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file(random_state(layout_shapes(TINY)), path, metadata={"sd_config": '{"version": "sd1"}'})
    with pytest.raises(CheckpointError, match="'sd_config' metadata is not an SDConfig"):
        load_checkpoint(path)


def test_a_checkpoint_that_is_not_a_path_is_one_clear_error():
    with pytest.raises(ValueError, match="a checkpoint is a file or folder path, got None"):
        load_checkpoint(None)


@pytest.mark.parametrize("device,match", [("tpu", "'tpu' is not a device"), ("xla", "unsupported device type"),
                                          (3.5, "is not a device")])
def test_a_device_the_machine_lacks_is_refused_before_reading(tmp_path, device, match):
    with pytest.raises(ValueError, match=match):
        load_checkpoint(tmp_path / "missing.safetensors", device=device)   # the device comes first
    with pytest.raises(ValueError, match=match):
        random_weights(TINY, device=device)
