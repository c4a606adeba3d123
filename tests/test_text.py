"""The CLIP tokenizer: usable tokenizers are accepted, unusable ones refused with the fix, an uncached
default fails in seconds when the hub is out of reach, and the long-prompt warning names the caller."""
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants
from transformers import CLIPTokenizer

from model import TINY
from model.text import TextEncoder, TokenizerError, _connect_address, byte_tokenizer, check_tokenizer, load_tokenizer

ROOT = Path(__file__).parents[1]
FIX = "pass --tokenizer DIR (Python: tokenizer=DIR)"


def special_tokens_only(folder):
    """What transformers silently settles for when the vocabulary is missing: the two special tokens."""
    (folder / "vocab.json").write_text(json.dumps({"<|startoftext|>": 49406, "<|endoftext|>": 49407}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return str(folder)


def closed_port():
    """A local port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_test_tokenizer_is_accepted(tokenizer_dir):
    assert load_tokenizer(tokenizer_dir)("the cat").input_ids == [49406, 514, 516, 49407]


def test_byte_tokenizer_is_accepted():
    tokenizer = byte_tokenizer()
    assert check_tokenizer(tokenizer) is tokenizer
    ids = TextEncoder(TINY.text, tokenizer).tokenize(["ab"])[0, :4].tolist()
    assert ids == [49406, *tokenizer.convert_tokens_to_ids(["a", "b</w>"]), 49407]


def test_special_tokens_only_is_refused(tmp_path):
    with pytest.raises(TokenizerError, match="unusable: its vocabulary has 2 entries") as e:
        load_tokenizer(special_tokens_only(tmp_path))
    assert FIX in str(e.value) and "tokenizer/ folder" in str(e.value)


def test_vocabulary_without_the_probe_words_is_refused(tmp_path):
    """Big enough, but 'a photo of a cat' is all unknown tokens: every prompt would read the same."""
    vocab = {f"x{i}": i for i in range(300)} | {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="'a photo of a cat' becomes unknown tokens only") as e:
        load_tokenizer(str(tmp_path))
    assert FIX in str(e.value)


def test_unusable_tokenizer_object_is_refused(tmp_path):
    broken = CLIPTokenizer.from_pretrained(special_tokens_only(tmp_path))
    with pytest.raises(TokenizerError, match="unusable"):
        TextEncoder(TINY.text, broken)


def test_folder_without_vocabulary_files(tmp_path):
    with pytest.raises(TokenizerError, match="must contain vocab.json and merges.txt") as e:
        load_tokenizer(str(tmp_path))
    assert FIX in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist") as e:
        load_tokenizer(str(tmp_path / "tokenizer"))
    assert FIX in str(e.value)


OFFLINE_CHILD = """
import time
from model.text import TokenizerError, load_tokenizer
start = time.perf_counter()
try:
    load_tokenizer()
except TokenizerError as e:
    print(f"{time.perf_counter() - start:.2f}", e)
"""


def test_default_tokenizer_offline_and_not_cached_fails_fast(tmp_path):
    """Without the check, transformers returns a tokenizer without a vocabulary (after minutes of retries when
    the network is down) and every image ignores its prompt. A fresh process: huggingface_hub reads
    HF_HUB_OFFLINE and HF_HOME when imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", OFFLINE_CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    seconds, _, message = out.stdout.strip().partition(" ")
    assert message, f"no TokenizerError: {out.stdout}{out.stderr}"
    assert float(seconds) < 5
    assert "'openai/clip-vit-large-patch14' is not in the Hugging Face cache and downloads are off" in message
    assert FIX in message


def test_unreachable_hub_fails_fast(monkeypatch):
    for var in [v for v in os.environ if v.lower().endswith("_proxy") or v.endswith("_OFFLINE")]:
        monkeypatch.delenv(var)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.perf_counter()
    with pytest.raises(TokenizerError, match="not in the Hugging Face cache and http://127.0.0.1:.* cannot be reached"
                       ) as e:
        load_tokenizer("nobody/tokenizer-that-is-not-cached")
    assert time.perf_counter() - start < 5
    assert FIX in str(e.value)


def test_reachability_is_probed_through_the_proxy(monkeypatch):
    """Behind a proxy only the proxy can be reached directly: probing the hub itself would report it down."""
    for var in [v for v in os.environ if v.lower().endswith("_proxy")]:
        monkeypatch.delenv(var)
    assert _connect_address("https://huggingface.co") == ("huggingface.co", 443)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert _connect_address("https://huggingface.co") == ("proxy.example", 3128)
    monkeypatch.setenv("no_proxy", "huggingface.co")
    assert _connect_address("https://huggingface.co") == ("huggingface.co", 443)


def test_truncation_warning_points_at_the_caller(tokenizer_dir):
    """TextEncoder runs inside nn.Module.__call__: the warning must still name this file, not torch's."""
    encoder = TextEncoder(TINY.text, tokenizer_dir)
    with pytest.warns(UserWarning, match="truncated to the first 75") as record:
        context = encoder(["cat " * 100])
    assert context.shape == (1, 77, TINY.text.width)
    assert [w.filename for w in record if "truncated" in str(w.message)] == [__file__]


@pytest.mark.parametrize("source,message", [("", "the tokenizer is empty"),
                                            ("README.md", "is a file; give the folder")])
def test_a_file_or_an_empty_name_is_not_taken_for_a_hub_id(source, message):
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(source)


def test_a_tokenizer_with_ids_beyond_the_embedding_table_is_refused(tokenizer_dir):
    """CLIP's ids (up to 49407) on the lab model's 564-token encoder would be an IndexError inside the model."""
    small = replace(TINY.text, vocab_size=564, bos_id=562, eos_id=563, pad_id=563)
    with pytest.raises(TokenizerError, match="ids up to 49407, but this text encoder knows 564 tokens"):
        TextEncoder(small, tokenizer_dir).tokenize(["a cat"])
    with pytest.raises(TokenizerError, match="must be a CLIPTokenizer, a folder or a hub id, got 5"):
        TextEncoder(TINY.text, 5)
