"""Text conditioning: prompts -> [B, 77, C] context for the UNet's cross-attention.

Both SD generations use a CLIP text transformer, run here by transformers' CLIPTextModel:
- SD1: OpenAI CLIP ViT-L/14 (768 wide, 12 layers, quick_gelu); the context is the last layer
  after the final layer norm; prompts are padded with <|endoftext|> (49407).
- SD2: OpenCLIP ViT-H/14 (1024 wide, 24 layers, gelu); the context is the output of layer 23
  of 24 followed by the final layer norm, so the model is built with 23 layers; prompts are
  padded with 0, as open_clip.tokenize does. (model/convert.py maps the OpenCLIP weights.)
Every prompt is padded to the full 77 tokens: the UNet attends to the padding positions too,
so padding to the batch's longest prompt would change the images.
"""
import json
import os
import tempfile
import warnings

import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .config import TextConfig

DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"  # the same BPE vocabulary serves SD1 and SD2


def bytes_to_unicode():
    """CLIP's byte -> printable character table, in CLIP's vocabulary order: the printable bytes
    map to themselves and come first, the other 68 bytes map to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def write_tokenizer(folder, merges=()):
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt) into `folder`: the 512 byte symbols
    (plain and word-final), the given merges (pairs of symbols), and the special tokens at their
    real ids (<|startoftext|> 49406, <|endoftext|> 49407). Returns the folder."""
    chars = list(bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges])}
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def byte_tokenizer():
    """A stand-in tokenizer with no merges (every character is a token), for runs with random
    weights, which must work offline and whose output is noise whatever the token ids."""
    with tempfile.TemporaryDirectory() as folder:
        return CLIPTokenizer.from_pretrained(write_tokenizer(folder))


class TokenizerError(RuntimeError):
    """The CLIP tokenizer cannot be found or loaded."""


def load_tokenizer(source=None):
    """A CLIPTokenizer from a folder holding vocab.json + merges.txt, or a hub id (downloads
    about 2 MB once; needs to be online). Default: openai/clip-vit-large-patch14."""
    source = source or DEFAULT_TOKENIZER
    if os.path.isdir(source) and not all(os.path.isfile(os.path.join(source, f)) for f in ("vocab.json", "merges.txt")):
        raise TokenizerError(f"tokenizer folder {source!r} must contain vocab.json and merges.txt")
    try:
        return CLIPTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"could not load the CLIP tokenizer from {source!r} ({type(e).__name__}: {e}). "
            "Pass tokenizer=<folder with vocab.json and merges.txt> (the `tokenizer/` folder of any "
            "Stable Diffusion diffusers repository works; sample.py: --tokenizer), or go online once "
            f"so {DEFAULT_TOKENIZER!r} can be downloaded into the Hugging Face cache.") from e


class TextEncoder(nn.Module):
    """Callable: list of prompts -> context [B, 77, width].

    The tokenizer is resolved on first use (`tokenizer`: a CLIPTokenizer, a folder or a hub id),
    so the weights can be loaded and inspected without one.
    """

    def __init__(self, cfg: TextConfig, tokenizer=None):
        super().__init__()
        self.config = cfg
        self.transformer = CLIPTextModel(CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_length,
            hidden_act=cfg.act, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407))
        self._tokenizer = tokenizer

    def adapt_keys(self, state):
        """Checkpoint keys (`text_model.` prefix, transformers 4 layout) -> the installed
        transformers' CLIPTextModel keys (5.x drops the `text_model.` level)."""
        if any(k.startswith("text_model.") for k in self.transformer.state_dict()):
            return state
        return {k.removeprefix("text_model."): v for k, v in state.items()}

    def reset_position_ids(self):
        """position_ids is a non-persistent buffer, absent from checkpoints: rebuild it after
        loading into a model built on the meta device."""
        for module in self.transformer.modules():
            if "position_ids" in dict(module.named_buffers(recurse=False)):
                ids = torch.arange(self.config.max_length).unsqueeze(0)
                module.register_buffer("position_ids", ids, persistent=False)

    @property
    def tokenizer(self):
        if not isinstance(self._tokenizer, CLIPTokenizer):
            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    def tokenize(self, prompts):
        """list[str] -> token ids [B, 77]: <|startoftext|>, at most 75 tokens, <|endoftext|>, padding."""
        n = self.config.max_length
        rows = []
        for prompt, ids in zip(prompts, self.tokenizer(list(prompts)).input_ids):
            if len(ids) > n:
                warnings.warn(f"prompt {prompt[:40]!r}... is {len(ids) - 2} tokens long; "
                              f"truncated to the first {n - 2}", stacklevel=3)
                ids = ids[:n - 1] + ids[-1:]
            rows.append(ids + [self.config.pad_id] * (n - len(ids)))
        return torch.tensor(rows, device=self.transformer.device)

    def forward(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.transformer(input_ids=self.tokenize(prompts)).last_hidden_state
