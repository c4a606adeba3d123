"""Text conditioning: prompts -> [B, 77, C] context for the UNet's cross-attention.

CLIP text transformers, run by transformers' CLIPTextModel (sizes: docs/loading.md):
- SD1: CLIP ViT-L/14, its last layer after the final layer norm; padded with <|endoftext|>.
- SD2: OpenCLIP ViT-H/14, layer 23 of 24 then the final layer norm, so the model is built with
  23 layers; padded with 0, as open_clip.tokenize does (model/convert.py maps its weights).
- SDXL (DualTextEncoder): ViT-L and bigG, each at its penultimate layer without the final norm,
  concatenated; bigG's projected <|endoftext|> output is the pooled embedding (docs/sdxl.md).
Every prompt is padded to the full 77 tokens: the UNet attends to the padding positions too,
so padding to the batch's longest prompt would change the images.
"""
import json
import os
import socket
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
import warnings

import torch
import torch.nn as nn
from huggingface_hub import constants as hub_constants
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .config import TEXT_LAYERS, TextConfig

DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"  # the same BPE vocabulary serves SD1 and SD2


def bytes_to_unicode():
    """CLIP's byte -> printable character table, in CLIP's vocabulary order: the printable bytes
    map to themselves and come first, the other 68 bytes map to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def write_tokenizer(folder, merges=(), compact=False):
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt) into `folder`: the 512 byte symbols
    (plain and word-final), the given merges (pairs of symbols), and the special tokens at their
    real ids (<|startoftext|> 49406, <|endoftext|> 49407), or, with `compact`, right after the
    merges (a small vocabulary for a small model: TextConfig's vocab_size, bos_id and eos_id must
    match). Any text still tokenizes (byte symbols where no merge applies). Returns the folder."""
    chars = list(bytes_to_unicode().values())
    vocab = {tok: i for i, tok in
             enumerate(chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges])}
    first = len(vocab) if compact else 49406
    vocab.update({"<|startoftext|>": first, "<|endoftext|>": first + 1})
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
    """The CLIP tokenizer cannot be found or loaded, or is unusable."""


# How to get a working tokenizer, for every error below (sample.py users and Python callers alike).
TOKENIZER_FIX = ("pass --tokenizer DIR (Python: tokenizer=DIR) with a folder holding vocab.json "
                 "and merges.txt, e.g. the tokenizer/ folder of any Stable Diffusion diffusers "
                 f"repository, or go online once so the default {DEFAULT_TOKENIZER!r} gets cached")
MIN_VOCAB = 256   # byte-level BPE needs a symbol per byte to spell any text (CLIP's has 49408)
PROBE = "a photo of a cat"
HUB_TIMEOUT_S = 3


def load_tokenizer(source=None):
    """A checked CLIPTokenizer from a folder holding vocab.json + merges.txt, or from a hub id:
    taken from the Hugging Face cache, else downloaded (about 2 MB) if the hub can be reached.
    Default: DEFAULT_TOKENIZER."""
    if source is not None and not os.fspath(source):
        raise TokenizerError(f"the tokenizer is empty; {TOKENIZER_FIX}")
    source = os.fspath(source) if source is not None else DEFAULT_TOKENIZER
    if os.path.isfile(source):
        raise TokenizerError(f"tokenizer {source!r} is a file; "
                             "give the folder that holds vocab.json and merges.txt")
    if os.path.isdir(source):
        return check_tokenizer(_from_pretrained(_tokenizer_folder(source)), source)
    if os.path.isabs(source) or source.startswith((".", "~")):   # a path, never a hub id
        raise TokenizerError(f"tokenizer folder {source!r} does not exist; {TOKENIZER_FIX}")
    cached = _cached(source)
    if cached is not None:
        return cached
    reason = hub_unavailable()
    if reason:   # transformers would retry for minutes, then return a vocabulary-less tokenizer
        raise TokenizerError(f"the CLIP tokenizer {source!r} is not in the Hugging Face cache "
                             f"and {reason}; {TOKENIZER_FIX}")
    return check_tokenizer(_from_pretrained(source), source)


def check_tokenizer(tokenizer, source=None):
    """`tokenizer` (loaded from `source`), if it can tell prompts apart. transformers does not fail
    on missing vocabulary files: it returns a CLIPTokenizer holding only the special tokens, which
    turns every prompt into the same ids and so silently gives images that ignore the prompt."""
    problem = _tokenizer_problem(tokenizer)
    if problem:
        origin = f" from {source!r}" if source else ""
        raise TokenizerError(f"the CLIP tokenizer{origin} is unusable: {problem}, so every prompt "
                             f"would give the same tokens; {TOKENIZER_FIX}")
    return tokenizer


def _tokenizer_problem(tokenizer):
    """Why `tokenizer` cannot serve as CLIP's tokenizer, or None."""
    if len(tokenizer) < MIN_VOCAB:
        return f"its vocabulary has {len(tokenizer)} entries (CLIP's has 49408)"
    if set(tokenizer(PROBE, add_special_tokens=False).input_ids) <= set(tokenizer.all_special_ids):
        return f"{PROBE!r} becomes unknown tokens only"
    return None


def _tokenizer_folder(folder):
    if not all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt")):
        raise TokenizerError(f"tokenizer folder {folder!r} must contain vocab.json and merges.txt; "
                             f"{TOKENIZER_FIX}")
    return folder


def _from_pretrained(source, **kwargs):
    try:
        return CLIPTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        detail = (str(e).strip() or "no details").splitlines()[0]   # the rest: transformers' advice
        raise TokenizerError(f"could not load the CLIP tokenizer from {source!r} "
                             f"({type(e).__name__}: {detail}); {TOKENIZER_FIX}") from e


def _cached(hub_id):
    """The usable tokenizer `hub_id` from the local Hugging Face cache, or None. When it is not
    cached, transformers raises or returns a tokenizer without a vocabulary (by version)."""
    try:
        tokenizer = _from_pretrained(hub_id, local_files_only=True)
    except TokenizerError:
        return None
    return None if _tokenizer_problem(tokenizer) else tokenizer


def hub_unavailable():
    """Why the Hugging Face hub cannot be used right now, or None: offline mode is on, or the hub
    (or the proxy in front of it) accepts no connection within HUB_TIMEOUT_S."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):   # huggingface_hub reads them at import
        if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"downloads are off ({var}={os.environ[var]})"
    if hub_constants.HF_HUB_OFFLINE:
        return "downloads are off (HF_HUB_OFFLINE)"
    host, port = _connect_address(hub_constants.ENDPOINT)
    if not _accepts_connection(host, port, HUB_TIMEOUT_S):
        return (f"{hub_constants.ENDPOINT} cannot be reached "
                f"(no connection to {host}:{port} within {HUB_TIMEOUT_S} s)")
    return None


def _accepts_connection(host, port, timeout):
    """Whether host:port accepts a TCP connection within `timeout` seconds, name lookup included:
    hence the thread, as a socket's timeout does not cover DNS, which can hang when offline."""
    connected = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            connected.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)   # a hung lookup won't delay exit
    thread.start()
    thread.join(timeout)
    return bool(connected)


def _connect_address(url):
    """(host, port) a request for `url` connects to first: its scheme's proxy, else its host."""
    target = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    return target.hostname, target.port or (443 if target.scheme == "https" else 80)


def _caller_stacklevel():
    """The warnings.warn stacklevel, for the caller, of the first frame outside model/ and torch:
    TextEncoder runs inside nn.Module.__call__, so a fixed stacklevel would point at torch's
    module.py instead of the line that called the text encoder."""
    internal = tuple(os.path.dirname(f) + os.sep for f in (__file__, torch.__file__))
    frame, level = sys._getframe(1), 1   # level 1: the function that warns
    while frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


class TextEncoder(nn.Module):
    """Callable: list of prompts -> context [B, 77, width]; encode() also gives the pooled one.

    The tokenizer is resolved on first use (`tokenizer`: a CLIPTokenizer, a folder or a hub id),
    so the weights can be loaded and inspected without one.
    """

    def __init__(self, cfg: TextConfig, tokenizer=None):
        super().__init__()
        if cfg.layer not in TEXT_LAYERS:
            raise ValueError(f"text layer must be one of {TEXT_LAYERS}, got {cfg.layer!r}")
        self.config = cfg
        model = CLIPTextModelWithProjection if cfg.projection else CLIPTextModel
        self.transformer = model(CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
            max_position_embeddings=cfg.max_length, hidden_act=cfg.act, layer_norm_eps=1e-5,
            bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
            projection_dim=cfg.projection or cfg.width))
        if not (tokenizer is None or isinstance(tokenizer, (str, os.PathLike, CLIPTokenizer))):
            raise TokenizerError("tokenizer must be a CLIPTokenizer, a folder or a hub id, "
                                 f"got {tokenizer!r}")
        if isinstance(tokenizer, CLIPTokenizer):   # checked now; a folder or hub id once loaded
            self.check_vocabulary(check_tokenizer(tokenizer))
        self._tokenizer = tokenizer

    @property
    def encoders(self):
        return (self,)

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
            self._tokenizer = self.check_vocabulary(load_tokenizer(self._tokenizer))
        return self._tokenizer

    def check_vocabulary(self, tokenizer):
        """`tokenizer`, if its ids fit the embedding table (lab model: 564 rows, CLIP: 49408)."""
        ids = max(tokenizer.get_vocab().values()) + 1
        if ids > self.config.vocab_size:
            raise TokenizerError(f"the tokenizer has ids up to {ids - 1}, but this text encoder "
                                 f"knows {self.config.vocab_size} tokens: use the model's own "
                                 "tokenizer (the lab model's is lab/tokenizer)")
        return tokenizer

    def tokenize(self, prompts):
        """list[str] -> token ids [B, max_length]: <|startoftext|>, at most max_length - 2 tokens
        (75 for SD), <|endoftext|>, padding."""
        n = self.config.max_length
        rows = []
        for prompt, ids in zip(prompts, self.tokenizer(list(prompts)).input_ids, strict=True):
            if len(ids) > n:
                warnings.warn(f"prompt {prompt[:40]!r}... is {len(ids) - 2} tokens long; this "
                              f"model reads {n - 2} tokens at most ({n} with its start and end "
                              f"tokens): truncated to the first {n - 2} tokens",
                              stacklevel=_caller_stacklevel())
                ids = ids[:n - 1] + ids[-1:]
            rows.append(ids + [self.config.pad_id] * (n - len(ids)))
        return torch.tensor(rows, device=self.transformer.device)

    def encode(self, prompts):
        """list[str] -> (context [B, max_length, width], pooled [B, projection] or None)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        penultimate = self.config.layer == "penultimate"
        out = self.transformer(input_ids=self.tokenize(prompts), output_hidden_states=penultimate)
        # hidden_states: the embeddings, then each layer's output; [-2]: the penultimate, unnormed
        context = out.hidden_states[-2] if penultimate else out.last_hidden_state
        return context, out.text_embeds if self.config.projection else None

    def forward(self, prompts):
        return self.encode(prompts)[0]


class DualTextEncoder(nn.Module):
    """SDXL's text conditioning (module docstring): `first` CLIP ViT-L, `second` OpenCLIP ViT-bigG
    with its projection, one tokenizer for both (the same BPE vocabulary; each pads its own way)."""

    def __init__(self, cfg: TextConfig, cfg2: TextConfig, tokenizer=None):
        super().__init__()
        self.first, self.second = TextEncoder(cfg, tokenizer), TextEncoder(cfg2, tokenizer)

    @property
    def encoders(self):
        return self.first, self.second

    @property
    def tokenizer(self):
        return self.first.tokenizer

    def tokenize(self, prompts):
        return self.first.tokenize(prompts)

    def encode(self, prompts):
        """list[str] -> (context [B, 77, 768 + 1280], pooled [B, 1280])."""
        self.second._tokenizer = self.first.tokenizer   # resolved once, for both
        first, _ = self.first.encode(prompts)
        second, pooled = self.second.encode(prompts)
        return torch.cat([first, second], dim=-1), pooled

    def forward(self, prompts):
        return self.encode(prompts)[0]
